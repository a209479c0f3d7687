"""One training loop for every stage, on accelerate: CPU, one or many GPUs, many nodes.

Checkpoints are safetensors (model, optimizer tensors, EMA) plus JSON (step, optimizer scalars),
written to a new folder and published by an atomic rename of `latest.json`, so a run killed at
any instant resumes from the last complete checkpoint. Batches are drawn from a generator seeded by
(seed, stage, step, rank): a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model, save_file

from .files import atomic_write_text
from .progress import start_progress


class MetricsLog:
    """Appends one JSON object a line to logs/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **row) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


def get_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---------------------------------------------------------------- checkpoints


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{k}"] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, v in [*load_file(str(folder / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(root: Path, step: int, model, opt, ema=None, extra: dict | None = None) -> None:
    """Write root/step-N/ and point root/latest.json at it; drop older checkpoints."""
    folder = root / f"step-{step:08d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Contiguous copies: a channels-last model's conv weights are strided, and safetensors wants them packed.
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    _save_optimizer(opt, folder)
    if ema is not None:
        save_file({f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                  str(folder / "ema.safetensors"))
    (folder / "state.json").write_text(json.dumps({
        "step": step, "ema_step": getattr(ema, "optimization_step", None), **(extra or {})}))
    atomic_write_text(root / "latest.json", json.dumps({"folder": folder.name, "step": step}))
    for old in root.glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(root: Path, model, opt, ema=None) -> dict | None:
    """Restore the latest checkpoint under root; None when there is none."""
    try:
        latest = json.loads((root / "latest.json").read_text())
    except FileNotFoundError:
        return None
    folder = root / latest["folder"]
    load_model(model, str(folder / "model.safetensors"))
    _load_optimizer(opt, folder)
    state = json.loads((folder / "state.json").read_text())
    if ema is not None and (folder / "ema.safetensors").exists():
        shadow = load_file(str(folder / "ema.safetensors"))
        ema.shadow_params = [shadow[f"{i}"].to(p.device) for i, p in enumerate(ema.shadow_params)]
        ema.optimization_step = state["ema_step"]
    return state


# ---------------------------------------------------------------- the loop


@dataclass
class StageSpec:
    """What one stage hands the loop."""

    name: str
    model: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, torch.Generator], tuple[torch.Tensor, dict]]  # (model, batch rng)
    steps: int
    lr: float
    warmup: int
    batch_size: int
    weight_decay: float = 0.0
    eval_fn: Callable[[int], dict] | None = None  # main process; step -> metrics
    ema: object | None = None  # diffusers.training_utils.EMAModel
    max_grad_norm: float = 1.0
    # learning-rate multipliers by parameter-name prefix, e.g. {"text_encoder.": 0.3}; others get 1
    lr_scales: dict[str, float] = field(default_factory=dict)


class Engine:
    """Owns the accelerator, the metrics log and the checkpoint folder of one training run."""

    def __init__(self, workdir: Path, seed: int, mixed_precision: str = "no", checkpoint_every: int = 500,
                 eval_every: int = 1000, log_every: int = 25, progress: bool = True):
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision=mixed_precision)
        self.workdir, self.seed = workdir, seed
        self.checkpoint_every, self.eval_every, self.log_every = checkpoint_every, eval_every, log_every
        self.progress = progress and self.is_main
        self.log = MetricsLog(workdir / "logs" / "metrics.jsonl", self.is_main)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def batch_rng(self, stage: str, step: int) -> torch.Generator:
        key = f"{self.seed}/{stage}/{step}/{self.accelerator.process_index}"
        return torch.Generator().manual_seed(hash_str(key))

    def run(self, s: StageSpec) -> dict:
        """Train one stage to s.steps, resuming from its last checkpoint; returns the last metrics."""
        a = self.accelerator
        groups: dict[tuple[bool, float], list] = {}
        for name, p in s.model.named_parameters():
            if p.requires_grad:
                scale = next((v for k, v in s.lr_scales.items() if name.startswith(k)), 1.0)
                groups.setdefault((p.ndim >= 2, scale), []).append(p)
        opt = torch.optim.AdamW([{"params": ps, "weight_decay": s.weight_decay if decay else 0.0, "scale": scale}
                                 for (decay, scale), ps in groups.items()], lr=s.lr, betas=(0.9, 0.99))
        ckpt_root = self.workdir / "checkpoints" / s.name
        state = load_checkpoint(ckpt_root, s.model, opt, s.ema)
        start = state["step"] if state else 0
        model, opt = a.prepare(s.model, opt)
        if s.ema is not None:
            s.ema.to(a.device)
        last: dict = {}
        bar = start_progress(s.steps, s.name, "loss", transient=False, completed=start, loss=float("nan"),
                             rate=0.0) if self.progress else None
        t0, seen = time.perf_counter(), 0
        try:
            for step in range(start, s.steps):
                for g in opt.param_groups:
                    g["lr"] = get_lr(step, s.steps, s.lr, s.warmup) * g.get("scale", 1.0)
                with a.autocast():
                    loss, logs = s.loss_fn(model, self.batch_rng(s.name, step))
                a.backward(loss)
                if s.max_grad_norm:
                    a.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if s.ema is not None:
                    s.ema.step(a.unwrap_model(model).parameters())
                seen += s.batch_size * a.num_processes
                done = step + 1
                if done % self.log_every == 0 or done == s.steps:
                    rate = seen / (time.perf_counter() - t0)
                    last = {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
                    self.log.write(stage=s.name, step=done, lr=opt.param_groups[0]["lr"],
                                   samples_per_s=round(rate, 1), **last)
                    if bar:
                        bar[0].update(bar[1], completed=done, loss=last["loss"], rate=rate)
                if done % self.checkpoint_every == 0 and done < s.steps:
                    self._checkpoint(ckpt_root, done, model, opt, s.ema)
                if s.eval_fn and (done % self.eval_every == 0 or done == s.steps):
                    self.barrier()
                    if self.is_main:
                        metrics = s.eval_fn(done)
                        model.train()
                        self.log.write(stage=s.name, step=done, eval=metrics)
                        last.update(metrics)
                    self.barrier()
        finally:
            if bar:
                bar[0].stop()
        self._checkpoint(ckpt_root, s.steps, model, opt, s.ema)
        return last

    def _checkpoint(self, root: Path, step: int, model, opt, ema) -> None:
        self.barrier()
        if self.is_main:
            save_checkpoint(root, step, self.accelerator.unwrap_model(model), opt, ema)
        self.barrier()


def hash_str(s: str) -> int:
    """A stable 56-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "little")
