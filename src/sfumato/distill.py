"""Latent consistency distillation: a model folder into a few-step one (LCMScheduler, 2-8 steps).

    sfumato distill models/mine --out models/mine-fast --steps 250    # a few-step folder of its own
    sfumato distill models/mine --attach                               # or carried in models/mine/unet_lcm

The method is diffusers' LCM distillation example (Luo et al., 2023): the student is the teacher's
UNet with a guidance-scale embedding (`time_cond_proj_dim`), so one forward pass replaces the
conditional and unconditional passes of classifier-free guidance; it learns to map a point of the
teacher's guided ODE trajectory (one DDIM step of the teacher from t to t - k) to the same x0 as a
slowly moving target copy of itself does from the later point. diffusers ships the scheduler and
the embedding but no trainer, so the loop is written here, on the training engine (checkpoints,
resume, progress) and the same cached latents and text states as `sfumato train`.

The folder it writes is a plain diffusers Stable Diffusion folder with an LCMScheduler; both
`StableDiffusionPipeline` and `LatentConsistencyModelPipeline` sample it, and sfumato takes its
default steps and guidance from the folder's sfumato.json. With --attach the distilled UNet goes
into the model's own folder (unet_lcm/): the model then samples in a few steps by default and
keeps its full samplers (`--scheduler "DPM++ 2M" --steps 20`), as the shipped default model does.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .pipeline import DISTILLED_ONLY, FAST_STEPS
from .sampling import guidance_embedding


@dataclass
class DistillCfg:
    # Short on purpose: on the default model the student scored best after 250 steps of 32 and lost
    # score with every step after (docs/speed.md, "How long to distil").
    steps: int = 250
    batch_size: int = 32
    lr: float = 2e-4  # a tiny UNet; diffusers' example uses 1e-6 for SD's 860 M parameters
    warmup: int = 100
    target_decay: float = 0.95  # EMA of the student that gives the targets (the example's default)
    solver_steps: int = 50  # DDIM skipping-step schedule of the teacher: k = 1000 / 50
    guidance_min: float = 2.0  # guidance scales the student learns (A1111 convention, 1 = none)
    guidance_max: float = 8.0
    huber_c: float = 0.001
    cond_dim: int = 256  # size of the guidance embedding (the example's default)
    pairs: int = 30_000  # ShapesWorld pairs rendered when the data is "shapesworld"
    seed: int = 0
    checkpoint_every: int = 250
    # Relation reward (sfumato.relation_reward): this weight times the hinge loss of `reward_batch`
    # ShapesWorld relation prompts drawn at the default settings; 0 = plain distillation.
    reward_weight: float = 0.0
    reward_batch: int = 8
    reward_every_step: bool = False  # score each step's x0 estimate, not only the image
    reward_target: str = "pixels"  # or "attention": the head words' cross-attention after the look-ahead


RANGES = {"steps": (1, 10**7), "batch_size": (1, 4096), "lr": (0, 1), "warmup": (0, 10**7),
          "target_decay": (0, 1), "solver_steps": (2, 1000), "guidance_min": (1, 50), "guidance_max": (1, 50),
          "huber_c": (0, 1), "cond_dim": (2, 4096), "pairs": (2, 10**7),
          "reward_weight": (0, 1000), "reward_batch": (1, 4096)}


def check(cfg: DistillCfg) -> None:
    for key, (low, high) in RANGES.items():
        v = getattr(cfg, key)
        if not low <= v <= high:
            raise UsageError(f"distill {key} must be between {low:g} and {high:g}, got {v!r}")
    if cfg.reward_target not in ("pixels", "attention"):
        raise UsageError(f"reward target must be pixels or attention, got {cfg.reward_target!r}")
    if cfg.guidance_min > cfg.guidance_max:
        raise UsageError(f"guidance range {cfg.guidance_min:g}-{cfg.guidance_max:g} is empty")


def student_unet(teacher, cond_dim: int):
    """The teacher's UNet with a guidance input whose projection starts at zero: before training the
    student computes exactly what the teacher computes for the conditional prompt."""
    from diffusers import UNet2DConditionModel

    if teacher.config.time_cond_proj_dim is not None:
        raise UsageError("this model is already distilled (its UNet takes a guidance embedding); distil its teacher")
    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": cond_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing == ["time_embedding.cond_proj.weight"], (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def lcm_scheduler(teacher_sampler_config: dict, solver_steps: int):
    """The teacher's noise schedule as an LCMScheduler (trailing spacing reaches t = T-1, which a
    zero-terminal-SNR model needs)."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(teacher_sampler_config, original_inference_steps=solver_steps,
                                    timestep_spacing="trailing", clip_sample=False)


class ConsistencyLoss:
    """One distillation batch: the loss of the student against the target net on the teacher's step."""

    def __init__(self, teacher, target, lcm, latents, text, scaling: float, cfg: DistillCfg, ema):
        from .diffusion import posterior_sample, predicted_eps, predicted_x0

        self.teacher, self.target, self.lcm, self.cfg, self.ema = teacher, target, lcm, cfg, ema
        self.latents, self.scaling = latents, scaling
        self.states, self.rows, self.empty = text
        self.x0, self.eps, self.sample = predicted_x0, predicted_eps, posterior_sample
        self.kind = lcm.config.prediction_type
        self.alphas = lcm.alphas_cumprod.float()
        k = lcm.config.num_train_timesteps // cfg.solver_steps
        self.k = k
        self.ts = torch.arange(1, cfg.solver_steps + 1) * k - 1  # k-1, 2k-1, ..., T-1

    def _a(self, t):
        return self.alphas[t].view(-1, 1, 1, 1)

    def _boundary(self, t):
        c_skip, c_out = self.lcm.get_scalings_for_boundary_condition_discrete(t.float())
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    def __call__(self, model, idx: np.ndarray, g: torch.Generator):
        cfg, n = self.cfg, len(idx)
        z = self.sample(self.latents, idx, g, self.scaling)
        ctx = self.states[self.rows[torch.as_tensor(idx)]].float()
        t = self.ts[torch.randint(len(self.ts), (n,), generator=g)]
        t_prev = (t - self.k).clamp(min=0)
        noise = torch.randn(z.shape, generator=g)
        a = self._a(t)
        x_t = self.lcm.add_noise(z, noise, t)
        guidance = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(n, generator=g)
        w_emb = guidance_embedding(guidance, cfg.cond_dim)
        w = (guidance - 1).view(-1, 1, 1, 1)

        c_skip, c_out = self._boundary(t)
        pred = model(x_t, t, timestep_cond=w_emb, encoder_hidden_states=ctx).sample
        student = c_skip * x_t + c_out * self.x0(self.kind, x_t, pred, a)

        with torch.no_grad():
            # The teacher's guided estimate at t (both halves in one batch), then one DDIM step to t - k.
            out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([ctx, self.empty.float().expand_as(ctx)])).sample
            cond, uncond = out.chunk(2)
            x0 = self.x0(self.kind, x_t, cond, a) * (1 + w) - w * self.x0(self.kind, x_t, uncond, a)
            eps = self.eps(self.kind, x_t, cond, a) * (1 + w) - w * self.eps(self.kind, x_t, uncond, a)
            a_prev = self._a(t_prev)
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            self.ema.copy_to(self.target.parameters())
            c_skip_p, c_out_p = self._boundary(t_prev)
            tgt = self.target(x_prev, t_prev, timestep_cond=w_emb, encoder_hidden_states=ctx).sample
            target = c_skip_p * x_prev + c_out_p * self.x0(self.kind, x_prev, tgt, a_prev)
        c = cfg.huber_c
        loss = (torch.sqrt((student.float() - target.float()) ** 2 + c * c) - c).mean()
        return loss, {}


def distill(model: str | Path, out: str | Path | None, cfg: DistillCfg, data_source: str = "shapesworld",
            resume: bool = False, overwrite: bool = False, progress: bool = True, attach: bool = False,
            init: str | Path | None = None) -> Path:
    """Distil the model folder `model` into `out` (with attach: into `model`/unet_lcm); resumable from
    `out`.partial/checkpoints. `init`: a distilled UNet folder of this teacher to go on from."""
    from diffusers.training_utils import EMAModel

    from .config import DataCfg
    from .data import load_pairs_data
    from .diffusion import cache_latents, cache_text
    from .engine import Engine, StageSpec
    from .files import publish_dir
    from .models import quiet_libraries
    from .pipeline import FAST_UNET, load
    from .train import _check_folders, partial_dir

    check(cfg)
    if attach == (out is not None):
        raise UsageError("give either --out FOLDER (a few-step model of its own) or --attach (into the model)")
    out = Path(model) / FAST_UNET if attach else Path(out)
    work = partial_dir(out)
    _check_folders(out, work, resume, overwrite)
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    pipe = load(model, device="cpu")
    if Path(model).resolve() == out.resolve():
        raise UsageError("--out must be another folder than the model being distilled")
    student = student_unet(pipe.unet, cfg.cond_dim)
    if init is not None:
        _load_student(student, Path(init))
    data = load_pairs_data(data_source, DataCfg(res=pipe.native, shapes_n=cfg.pairs), progress=progress)
    if not len(data.train_idx):
        raise UsageError(f"{data_source} has no training pairs to distil on")
    if overwrite and not resume:
        shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    latents = cache_latents(pipe.vae, data.images, progress=progress)
    text = cache_text(pipe.tokenizer, pipe.text_encoder, data.captions)
    lcm = lcm_scheduler(pipe.scheduler_config, cfg.solver_steps)
    teacher = pipe.unet.eval().requires_grad_(False)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    ema = EMAModel(student.parameters(), decay=cfg.target_decay)
    step_loss = ConsistencyLoss(teacher, target, lcm, latents, text, pipe.vae.config.scaling_factor, cfg, ema)
    train_idx = data.train_idx
    reward = None
    if cfg.reward_weight > 0:
        from .pipeline import make_scheduler
        from .relation_reward import RelationReward

        fast = _fast_generation(cfg)
        reward = RelationReward(pipe, make_scheduler(fast["scheduler"], pipe.scheduler_config), fast["steps"],
                                fast["guidance"], cfg.reward_batch, cfg.seed, cfg.reward_every_step, cfg.reward_target)

    def loss_fn(m, g):
        pick = torch.randint(len(train_idx), (cfg.batch_size,), generator=g).numpy()
        loss, logs = step_loss(m, train_idx[pick], g)
        if reward is not None:
            extra, logs = reward(m, g)
            logs = {"consistency": loss.item(), "reward_loss": extra.item(), **logs}
            loss = loss + cfg.reward_weight * extra
        return loss, logs

    engine = Engine(work, cfg.seed, checkpoint_every=cfg.checkpoint_every, eval_every=10**9, progress=progress)
    t0 = time.time()
    metrics = engine.run(StageSpec("distill", student.train(), loss_fn, cfg.steps, cfg.lr, cfg.warmup,
                                   cfg.batch_size, ema=ema))
    seconds = time.time() - t0
    final = copy.deepcopy(student)
    ema.copy_to(final.parameters())  # the target net's weights
    record = {"teacher_hash": pipe.hash, "config": asdict(cfg), "seconds": round(seconds, 1),
              "loss": metrics.get("loss")}
    if attach:
        _attach(final, work, out, Path(model), cfg, record)
    else:
        _write_folder(final, lcm, work, cfg, record, Path(model))
        publish_dir(work, out)
    return out


def _load_student(student, folder: Path) -> None:
    """Go on from an earlier distillation: its weights, which must fit the student exactly."""
    from safetensors.torch import load_file

    path = folder / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise UsageError(f"--init: {path} does not exist (give a distilled unet folder, e.g. MODEL/unet_lcm)")
    try:
        student.load_state_dict(load_file(str(path)))  # strict: every tensor by name and shape
    except RuntimeError:
        raise UsageError(f"--init: {folder} is not a distilled UNet of this model (another architecture or "
                         f"guidance input size)") from None


def _card(teacher_folder: Path) -> dict:
    path = teacher_folder / "sfumato.json"
    return json.loads(path.read_text()) if path.is_file() else {"format": "sfumato-model/1"}


def _fast_generation(cfg: DistillCfg) -> dict:
    from .config import GenerationSettings

    guidance = min(max(GenerationSettings.guidance, cfg.guidance_min), cfg.guidance_max)  # the teacher's default
    return {"scheduler": "LCM", "steps": FAST_STEPS, "guidance": guidance}


def _attach(final, work: Path, out: Path, model: Path, cfg: DistillCfg, record: dict) -> None:
    """The distilled UNet into model/unet_lcm, and the card's defaults to few-step sampling (the
    defaults it had before kept as "full_generation", for the other samplers)."""
    from .config import GenerationSettings
    from .files import atomic_write_text, publish_dir
    from .train import versions

    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    final.eval().save_pretrained(work / "unet")
    card = _card(model)
    full = card.get("full_generation") or card.get("generation") or {}
    if full.get("scheduler") in DISTILLED_ONLY or not full:
        full = {"scheduler": GenerationSettings.scheduler, "steps": GenerationSettings.steps,
                "guidance": GenerationSettings.guidance}
    card["full_generation"] = full
    card["generation"] = _fast_generation(cfg)
    card["distilled"] = {**record, "unet": out.name, "versions": versions()}
    publish_dir(work / "unet", out)
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(model / "sfumato.json", json.dumps(card, indent=1, default=str))


def _write_folder(final, lcm, work: Path, cfg: DistillCfg, record: dict, teacher_folder: Path) -> None:
    """The teacher's folder with the distilled UNet and an LCMScheduler."""
    from .train import versions

    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    for part in ("tokenizer", "text_encoder", "vae", "clip"):
        if (teacher_folder / part).is_dir():
            shutil.copytree(teacher_folder / part, work / part, dirs_exist_ok=True)
    final.eval().save_pretrained(work / "unet")
    lcm.save_pretrained(work / "scheduler")
    index = json.loads((teacher_folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (work / "model_index.json").write_text(json.dumps(index, indent=1))
    card = _card(teacher_folder)
    card.pop("full_generation", None)
    card["generation"] = _fast_generation(cfg)
    card["distilled"] = {"teacher": str(teacher_folder), **record, "versions": versions()}
    (work / "sfumato.json").write_text(json.dumps(card, indent=1, default=str))


__all__ = ["DistillCfg", "distill", "student_unet", "lcm_scheduler", "guidance_embedding", "FAST_STEPS"]
