"""`sfumato train`: tokenizer -> CLIP -> VAE -> UNet, into a diffusers-layout model folder.

    sfumato train --data shapesworld --out models/tiny --preset tiny
    accelerate launch --cpu --num_processes 2 -m sfumato train --data DIR --out MODEL --preset tiny

Everything is built in MODEL.partial/ (checkpoints, logs, finished components) and renamed to MODEL
once every component is there, so a killed run never leaves a folder that looks complete;
`--resume` continues from the last checkpoint of the unfinished stage.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import TrainCfg, apply_overrides, from_dict, to_dict, validate
from .data import PairData, load_pairs_data, to_model_range
from .engine import Engine, StageSpec
from .errors import UsageError
from .files import atomic_write_text, publish_dir
from .models import quiet_libraries

STAGES = ("tokenizer", "clip", "vae", "unet")
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler", "clip")


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {"sfumato": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UsageError(f"unknown stage {bad[0] if bad else text!r}; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in stages)  # always in pipeline order


class Run:
    """State of one training run: MODEL.partial/run.json says which stages are done."""

    def __init__(self, out: Path, cfg: TrainCfg, data: PairData, engine: Engine):
        self.out, self.cfg, self.data, self.engine = out, cfg, data, engine
        self.work = partial_dir(out)
        self.state_path = self.work / "run.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "config": to_dict(cfg), "data": {"source": data.source, "fingerprint": data.fingerprint, **data.stats},
            "done": [], "metrics": {}, "seconds": {}, "versions": versions()}

    def save(self) -> None:
        if self.engine.is_main:
            self.state["config"] = to_dict(self.cfg)
            atomic_write_text(self.state_path, json.dumps(self.state, indent=1, default=str))

    def finish_stage(self, name: str, metrics: dict, seconds: float) -> None:
        self.state["done"] = [s for s in STAGES if s in {*self.state["done"], name}]
        self.state["metrics"][name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.state["seconds"][name] = round(self.state["seconds"].get(name, 0) + seconds, 1)
        self.save()


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def train(data_source: str, out: str | Path, cfg: TrainCfg, stages: tuple[str, ...] = STAGES,
          resume: bool = False, force: bool = False, overwrite: bool = False, overrides: list[str] = (),
          progress: bool = True) -> Path:
    """Run the stages; return the finished model folder (or the partial one if stages remain)."""
    out = Path(out)
    work = partial_dir(out)
    quiet_libraries()
    engine = Engine(work, cfg.seed, cfg.mixed_precision, cfg.checkpoint_every, cfg.eval_every, cfg.log_every,
                    progress)
    _check_folders(out, work, resume, overwrite)
    if resume and (work / "run.json").exists():
        saved = json.loads((work / "run.json").read_text())
        cfg = apply_overrides(from_dict(saved["config"]), list(overrides))
    if cfg.unet.init and not (Path(cfg.unet.init) / "diffusion_pytorch_model.safetensors").is_file():
        raise UsageError(f"unet.init: {cfg.unet.init} has no diffusion_pytorch_model.safetensors "
                         f"(give a diffusers unet/ folder)")
    validate(cfg)
    # The data is read before anything is written, so a bad data set leaves no folder behind.
    data = load_pairs_data(data_source, cfg.data, progress=progress and engine.is_main)
    check_split(data, cfg.data.holdout, stages)
    if engine.is_main:
        if overwrite and not resume:
            shutil.rmtree(work, ignore_errors=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)
    engine.barrier()
    run = Run(out, cfg, data, engine)
    if resume and run.state["data"]["fingerprint"] != data.fingerprint and not force:
        raise UsageError(f"the data at {data_source} changed since this run started "
                         f"(fingerprint {data.fingerprint[:12]} != {run.state['data']['fingerprint'][:12]}); "
                         "pass --force to resume on it anyway")
    run.state["data"].update(source=data.source, fingerprint=data.fingerprint)
    engine.barrier()
    run.save()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    from . import stages as st

    for name in stages:
        if name in run.state["done"] and resume:
            continue
        t0 = time.time()
        metrics = getattr(st, f"run_{name}")(run)
        engine.barrier()
        run.finish_stage(name, metrics, time.time() - t0)
    engine.barrier()
    if engine.is_main and all((work / c).exists() for c in COMPONENTS):
        return finalize(run)
    return out if out.exists() and not work.exists() else work


MIN_TRAIN, MIN_HELD_OUT = 2, 1  # contrastive batches need two pairs; validation needs one


def check_split(data: PairData, holdout: float, stages: tuple[str, ...] = STAGES) -> None:
    """Refuse, before any training, a train/held-out split that leaves a side too small (the
    tokenizer alone validates nothing, so it needs no held-out pair)."""
    n_train, n_val = len(data.train_idx), len(data.val_idx)
    need_val = MIN_HELD_OUT if set(stages) - {"tokenizer"} else 0
    if n_train < MIN_TRAIN or n_val < need_val:
        raise UsageError(f"the train/held-out split (data.holdout={holdout:g}) leaves {n_train} training and "
                         f"{n_val} held-out pairs of {len(data.ids)}; training needs at least {MIN_TRAIN} and "
                         f"{MIN_HELD_OUT}: add pairs (a held-out share of {holdout:g} needs about "
                         f"{max(MIN_TRAIN + MIN_HELD_OUT, round(MIN_HELD_OUT / max(holdout, 1e-9)))}) "
                         "or raise --set data.holdout")


def _check_folders(out: Path | None, work: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a model or an unfinished run unless asked; a finished MODEL is only replaced
    at the very end, so an interrupted --overwrite run keeps the old model and can be resumed.
    `out` None: the run replaces part of a model by design, and only an unfinished run is guarded."""
    if resume:
        if not work.exists():
            raise UsageError(f"nothing to resume: {work} does not exist")
    elif not overwrite:
        if out is not None and out.exists():
            raise UsageError(f"{out} exists; pass --overwrite to replace it")
        if work.exists():
            raise UsageError(f"an unfinished run is in {work}; pass --resume to continue it or --overwrite to restart")


def finalize(run: Run) -> Path:
    """Write model_index.json and sfumato.json, drop checkpoints, and rename into place."""
    work, out = run.work, run.out
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": versions()["diffusers"],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", _scheduler_class(work)],
        "text_encoder": ["transformers", _text_encoder_class(work)], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (work / "model_index.json").write_text(json.dumps(index, indent=1))
    card = {k: run.state[k] for k in ("config", "data", "metrics", "seconds", "versions")}
    card["format"] = "sfumato-model/1"
    (work / "sfumato.json").write_text(json.dumps(card, indent=1, default=str))
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    (work / "run.json").unlink(missing_ok=True)
    publish_dir(work, out)
    return out


def _scheduler_class(work: Path) -> str:
    return json.loads((work / "scheduler" / "scheduler_config.json").read_text())["_class_name"]


def _text_encoder_class(work: Path) -> str:
    """CLIPTextModel, or MegatronBertModel for a tower trained bidirectional (unet.text_bidirectional)."""
    return json.loads((work / "text_encoder" / "config.json").read_text())["architectures"][0]


__all__ = ["train", "STAGES", "parse_stages", "StageSpec", "to_model_range"]
