"""The mean prior: where the data puts things for a caption, and the few-step UNet does not.

A few-step (LCM) sampler decides the layout at its first step: the estimate D(x_T, c) from pure noise,
which every later step re-noises and keeps. Averaged over starting noises that estimate should be the
data's mean latent for the caption, E[z0 | c]: for "a red circle to the left of a blue square", red
mass on the left and blue on the right. The shipped UNet's average ignores the relation (docs/recipe.md,
rounds 10 and 16), and sixteen rounds of training it to read relations did not change that. Moving
each first estimate by the data's mean less the model's, measured from renders of the prompt's
scenes, takes the position pass rate from 0.25–0.29 to 0.43–0.475 at gain 4 (round 17), so what is
missing is a map from the caption to a mean layout.

`MeanPrior` learns that map directly, as a model of its own: the text tower's states (B, L, D), mixed by
a small bidirectional transformer (the causal tower tells the words before a relation nothing of it),
are read by one query per cell of a coarse grid (learnt embeddings, so every cell knows where it is),
each drawing a patch of the latent. Fitted by plain regression on the training pairs,

    target = z0 - D(eps, c),   eps ~ N(0, I), z0 the pair's latent,

its minimiser is E[z0 | c] - E_eps[D(eps, c)]: what the data's mean has that the model's first
estimates lack on average. Each target has its per-channel mean over the canvas taken out (the output
likewise), so the prior moves mass and leaves the palette to the UNet: the backgrounds of the pairs
are drawn at random, and their mean colour is a grey the model never draws (round 16).

At sampling, the first estimate of the few-step UNet it was fitted to is moved by `gain` times the
prior (`denoise(first_shift=...)`); the later steps run as usual. As with classifier-free guidance,
a gain above 1 asks for more than the mean: the first estimate is mostly noise again at the next step,
and too little of a gain-1 shift survives it. Nothing here parses the prompt: the prior reads the
same text states the UNet reads. Plain diffusers ignores the folder.

Fitted on pairs alone (up to 51,000 ShapesWorld pairs) the prior learns the mean but not what the
relation changes in it (round 17), and at the gains the relation needs that shared part costs
position (round 18). So on ShapesWorld it learns the relation's contrast alone: over groups of
prompts that differ only in their relation (`relation_targets`: each variant's mean render less the
model's mean first estimate, the render noise shared in a group, so it cancels in the contrast), and
zero on captions that name no relation. At gain 8: position 0.25 / 0.23 -> 0.54 / 0.55 over 400
samples at two seeds (round 18). On other pairs, which have no such groups, `fit_into` runs the plain fit.
A model has a prior only once one is fitted into it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import UsageError

FOLDER = "mean_prior"  # the component's folder in a model folder, beside unet_lcm/


class MeanPrior(ModelMixin, ConfigMixin):
    """Text states (B, L, text_width) -> a latent-shaped layout (B, latent_channels, S, S) whose
    per-channel mean over the canvas is zero."""

    @register_to_config
    def __init__(self, text_width: int = 128, width: int = 128, heads: int = 4, mix_layers: int = 2,
                 read_layers: int = 1, grid: int = 8, latent_channels: int = 4, sample_size: int = 16):
        super().__init__()
        if sample_size % grid:
            raise ValueError(f"the latent side ({sample_size}) must be a multiple of the grid ({grid})")
        self.proj_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        mix = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.mix = nn.TransformerEncoder(mix, mix_layers, enable_nested_tensor=False)
        # one query per grid cell, each drawing a patch of latent cells (the layout is coarse)
        self.cells = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.read = nn.ModuleList(Read(width, heads) for _ in range(read_layers))
        patch = sample_size // grid
        self.proj_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, latent_channels * patch * patch))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        c = self.config
        tokens = self.mix(self.proj_in(states.to(self.cells.dtype)))
        cells = self.cells.expand(len(states), -1, -1)
        for block in self.read:
            cells = block(cells, tokens)
        out = self.proj_out(cells).transpose(1, 2).reshape(len(states), -1, c.grid, c.grid)
        return centred(nn.functional.pixel_shuffle(out, c.sample_size // c.grid))


class Read(nn.Module):
    """The cells read the words: cross-attention then a feed-forward layer, pre-norm. No attention among
    the cells: at 256 cells a batch it cost 30 times the rest of the model."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(width), nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, cells: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        cells = cells + self.attn(self.norm(cells), tokens, tokens, need_weights=False)[0]
        return cells + self.ff(self.norm_ff(cells))


def centred(z: torch.Tensor) -> torch.Tensor:
    """z less its per-channel mean over the canvas: a layout, not a colour cast."""
    return z - z.mean((-2, -1), keepdim=True)


def layout_shift(prior: MeanPrior, states: torch.Tensor, gain: float, size: tuple[int, int]) -> torch.Tensor:
    """gain x the prior for these text states, at latent size `size` (H, W): resized where the image is
    not drawn at the prior's native size, since a layout is a fraction of the canvas."""
    with torch.no_grad():
        shift = prior(states)
    if tuple(shift.shape[-2:]) != tuple(size):
        shift = centred(nn.functional.interpolate(shift, size=size, mode="bilinear", align_corners=False))
    return gain * shift


@dataclass
class Targets:
    states: torch.Tensor  # (N, L, D) the text tower's states
    residuals: torch.Tensor  # (N, C, H, W) z0 - D(eps, c), centred


@torch.no_grad()
def first_step_targets(pipe, captions: list[str], images_u8: torch.Tensor, seed: int, batch: int = 128,
                       progress=None) -> Targets:
    """The regression targets of `fit`: each pair's latent less the few-step UNet's first estimate from
    a fresh noise under its caption (at the model's default few-step settings), centred."""
    from .reward_tuning import few_step_policy
    from .sampling import encode_images, encode_prompts

    policy = few_step_policy(pipe)
    unet, g = pipe.fast_unet.eval(), torch.Generator().manual_seed(seed)
    c = unet.config
    states, residuals = [], []
    for i in range(0, len(captions), batch):
        s = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions[i:i + batch]).float()
        z0 = encode_images(pipe.vae, images_u8[i:i + batch]).float()
        noise = torch.randn((len(s), c.in_channels, *z0.shape[-2:]), generator=g)
        first = policy.denoised(unet, noise, policy.timesteps[0], s)
        states.append(s.half())  # the states are many; half precision keeps 30,000 pairs in 250 MB
        residuals.append(centred(z0 - first))
        if progress is not None:
            progress(min(i + batch, len(captions)))
    return Targets(torch.cat(states), torch.cat(residuals))


@dataclass
class Variants:
    """Relation-variant targets: groups of prompts that differ only in their relation (all of a
    group's renders share their free attributes), each prompt's data mean less the model's mean first
    estimate, centred. What the relation changes, the contrast within a group, is nearly free of render
    noise, which a pair's own target buries (round 17: regression on pairs alone learns no relation)."""
    states: torch.Tensor  # (G, V, L, D)
    residuals: torch.Tensor  # (G, V, C, H, W)

    def __len__(self) -> int:
        return len(self.states)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """(G, V, ...) -> each variant less its group's mean: what the relation changes."""
    return x - x.mean(1, keepdim=True)


@torch.no_grad()
def relation_targets(pipe, prompts: int, seed: int, renders: int = 8, noises: int = 4,
                     progress=None) -> Variants:
    """`prompts` ShapesWorld position prompts (none of the evaluations at seeds 0 and 1), each under
    every relation (a group), with targets as `Variants` describes: the mean latent of `renders`
    renders less the few-step UNet's mean first estimate over `noises` noises shared in the group.
    Training reads the renderer's grammar to draw the variants; sampling never does."""
    import random

    from .first_step import relation_variants, render_means
    from .reward_tuning import few_step_policy, training_prompts
    from .sampling import encode_prompts
    from .shapesworld.checker import parse_prompt

    policy, c = few_step_policy(pipe), pipe.fast_unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    drawn = training_prompts(random.Random(f"clean/{seed}"), prompts, ("position",))
    g, states, residuals = torch.Generator().manual_seed(seed), [], []
    for k, (_, text) in enumerate(drawn):
        variants = relation_variants(parse_prompt(text))
        data = render_means(pipe.vae, variants, renders, f"clean/{seed}/{k}", pipe.native)
        ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [v.text for v in variants]).float()
        noise = torch.randn((noises, *shape), generator=g).repeat(len(variants), 1, 1, 1)
        first = policy.denoised(pipe.fast_unet, noise, policy.timesteps[0], ctx.repeat_interleave(noises, 0))
        states.append(ctx.half())
        residuals.append(centred(data - first.view(len(variants), noises, *shape).mean(1)))
        if progress is not None:
            progress(k + 1)
    return Variants(torch.stack(states), torch.stack(residuals))


def fit(train: Targets, held: Targets | None, prior: MeanPrior, steps: int, batch: int = 64, lr: float = 1e-3,
        seed: int = 0, progress=None, variants: Variants | None = None, weight: float = 10.0,
        group_batch: int = 16, plain_scale: float = 1.0) -> dict:
    """Regress the prior on the targets (AdamW, warm-up then cosine). With `variants`, each step also
    takes `group_batch` groups: their plain error plus `weight` times the error of the prior's contrast
    against theirs (the first 5 % of groups held out). `plain_scale` scales the pairs' targets and the
    groups' shared part (0: the relation's contrast alone, the pairs held at zero). Returns the mean
    squared errors of the last 10 % of steps and on the held-out targets, each against the zero
    layout's: the share of a pair's residual the prior explains is small, since one pair's residual is
    mostly its own placement."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    held_groups = len(variants) // 20 if variants is not None else 0
    if variants is not None and len(variants) - held_groups < 1:
        raise UsageError(f"the relation fit needs at least 1 group of variants, got {len(variants)}")
    prior.train()
    tail, tail0 = [], []
    for k in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(train.states), batch))
        target = plain_scale * train.residuals[idx]
        loss = plain = ((prior(train.states[idx].float()) - target) ** 2).mean()
        if variants is not None:
            gi = torch.from_numpy(rng.integers(held_groups, len(variants), group_batch))
            want = scaled(variants.residuals[gi], plain_scale)
            got = prior(variants.states[gi].flatten(0, 1).float()).view(want.shape)
            loss = loss + ((got - want) ** 2).mean() + weight * ((contrast(got) - contrast(want)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        sched.step()
        if k >= steps - max(1, steps // 10):
            tail.append(plain.item())
            tail0.append(target.pow(2).mean().item())
        if progress is not None:
            progress(k + 1, loss.item())
    prior.eval()
    out = {"train_mse": float(np.mean(tail)), "train_mse_zero": float(np.mean(tail0))}
    if held is not None and len(held.states):
        out.update(held_out_error(prior, Targets(held.states, plain_scale * held.residuals)))
    if held_groups:
        out.update(contrast_error(prior, Variants(variants.states[:held_groups], variants.residuals[:held_groups])))
    return out


def scaled(residuals: torch.Tensor, plain_scale: float) -> torch.Tensor:
    """Groups' targets with their shared part (the mean over a group) scaled, the contrast kept."""
    return contrast(residuals) + plain_scale * residuals.mean(1, keepdim=True)


@torch.no_grad()
def contrast_error(prior: MeanPrior, variants: Variants) -> dict:
    """The mean squared error of the prior's relation contrast on these groups, and none's."""
    want = contrast(variants.residuals)
    got = contrast(prior(variants.states.flatten(0, 1).float()).view(variants.residuals.shape))
    return {"held_contrast_mse": (got - want).pow(2).mean().item(), "held_contrast_mse_zero": want.pow(2).mean().item()}


@torch.no_grad()
def held_out_error(prior: MeanPrior, held: Targets, batch: int = 512) -> dict:
    err = sum(((prior(held.states[i:i + batch].float()) - held.residuals[i:i + batch]) ** 2).sum().item()
              for i in range(0, len(held.states), batch))
    return {"held_mse": err / held.residuals.numel(), "held_mse_zero": held.residuals.pow(2).mean().item()}


def split(targets: Targets, held: np.ndarray) -> tuple[Targets, Targets]:
    keep = torch.from_numpy(~held)
    return (Targets(targets.states[keep], targets.residuals[keep]),
            Targets(targets.states[~keep], targets.residuals[~keep]))


def for_pipeline(pipe, **config) -> MeanPrior:
    """A fresh prior shaped for this model's text tower and latents."""
    c = pipe.fast_unet.config
    grid = max(g for g in range(1, 9) if c.sample_size % g == 0)  # 8 x 8 cells where the latent allows
    return MeanPrior(text_width=pipe.text_encoder.config.hidden_size, latent_channels=c.in_channels,
                     sample_size=c.sample_size, **{"grid": grid, **config})


def fit_into(model: str | Path, data_source: str = "shapesworld", pairs: int = 16_000, steps: int | None = None,
             batch: int = 64, lr: float = 1e-3, gain: float | None = None, seed: int = 0, overwrite: bool = False,
             progress: bool = True, mix: str = "", relations: int | None = None, weight: float = 10.0) -> dict:
    """Fit a mean prior to the few-step UNet of the model folder `model` and write it to model/mean_prior,
    with `gain` as the card's default. Returns the fit's record (also in the card).

    With `relations` (ShapesWorld only; None: `config.MEAN_PRIOR_RELATIONS` with ShapesWorld, else 0)
    the prior learns the relation's contrast alone: over that many position prompts drawn under every
    relation (`relation_targets`), weighted by `weight`, and zero on the captions of `pairs` ShapesWorld
    scenes that name no relation (`mix`: their category shares, as `data.shapes_mix`). The shared part
    of the mean, which the plain fit adds, costs position at the gains the relation needs (round 18).
    Without, it is the plain fit on the pairs of `data_source` (`mix` as above for ShapesWorld), which
    learns the mean but no relation. Defaults: MEAN_PRIOR_STEPS and MEAN_PRIOR_GAIN of the mode.

    The folder is written beside its place and renamed in when complete; an interrupted fit leaves the
    model as it was."""
    from .config import MAX_MEAN_PRIOR, MEAN_PRIOR_GAIN, MEAN_PRIOR_RELATIONS, MEAN_PRIOR_STEPS
    from .models import quiet_libraries
    from .pipeline import load
    from .shapesworld.spec import mix_categories
    from .train import versions

    folder = Path(model)
    shapes = data_source == "shapesworld"
    relations = (MEAN_PRIOR_RELATIONS if shapes else 0) if relations is None else relations
    mode = "relations" if relations else "plain"
    gain = MEAN_PRIOR_GAIN[mode] if gain is None else gain
    steps = MEAN_PRIOR_STEPS[mode] if steps is None else steps
    if not 0 < gain <= MAX_MEAN_PRIOR:
        raise UsageError(f"--gain must be above 0 and at most {MAX_MEAN_PRIOR:g}, got {gain:g}")
    if relations and not shapes:
        raise UsageError(f"--relations draws ShapesWorld prompts under each relation, so it needs --data "
                         f"shapesworld; with {data_source} use --relations 0")
    if weight < 0:
        raise UsageError(f"--relation-weight must be at least 0, got {weight:g}")
    for name, value, low in (("--steps", steps, 1), ("--batch-size", batch, 1), ("--pairs", pairs, 2),
                             ("--relations", relations, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    try:
        anchored = tuple(c for c in mix_categories(mix) if c != "position")
    except ValueError as e:
        raise UsageError(f"--mix: {e}") from None
    if relations and not anchored:
        raise UsageError("--mix leaves no category but position; the relation fit needs captions that name no relation")
    out = folder / FOLDER
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to fit it again")
    quiet_libraries()
    torch.manual_seed(seed)
    pipe = load(folder, device="cpu", onnx=False)
    if pipe.fast_unet is None:
        raise UsageError(f"{folder} has no few-step UNet, whose first step the mean prior moves; distil one first "
                         f"with `sfumato distill {folder} --attach`")
    t0 = time.time()
    if relations:
        train, held = _anchors(pipe, pairs, anchored, progress)
        with _bar(progress, relations, "relation variants") as done:
            variants = relation_targets(pipe, relations, seed, progress=done)
    else:
        train, held = _pair_targets(pipe, data_source, pairs, mix, seed, progress)
        variants = None
    prior = for_pipeline(pipe)
    with _bar(progress, steps, "mean prior") as done:
        stats = fit(train, held, prior, steps, batch, lr, seed, progress=done and (lambda k, loss: done(k)),
                    variants=variants, weight=weight, plain_scale=0.0 if relations else 1.0)
    return install(folder, prior, gain, {
        "data": data_source, "mix": mix, "pairs": len(train.states) + (len(held.states) if held else 0),
        "relations": relations, "relation_weight": weight, "steps": steps, "batch_size": batch, "lr": lr,
        "seed": seed, "seconds": round(time.time() - t0, 1), **{k: round(v, 5) for k, v in stats.items()},
        "versions": versions()})


def _pair_targets(pipe, data_source: str, pairs: int, mix: str, seed: int, progress: bool) -> tuple[Targets, Targets]:
    """The plain fit's targets over the training pairs, and the held-out pairs'."""
    from .config import DataCfg
    from .data import load_pairs_data

    data = load_pairs_data(data_source, DataCfg(res=pipe.native, shapes_n=pairs, shapes_mix=mix), progress=progress)
    if len(data.train_idx) < 2:
        raise UsageError(f"{data_source} has {len(data.train_idx)} training pairs; the mean prior needs at least 2")
    with _bar(progress, len(data.captions), "first estimates") as done:
        targets = first_step_targets(pipe, data.captions, data.images, seed, progress=done)
    return split(targets, data.holdout)


@torch.no_grad()
def _anchors(pipe, n: int, categories: tuple[str, ...], progress: bool, batch: int = 256) -> tuple[Targets, None]:
    """The text states of n ShapesWorld captions that name no relation, each with a zero target: a
    relation-only prior should leave such a caption's first estimate alone. Only the captions are
    drawn; no image is rendered."""
    from .sampling import encode_prompts
    from .shapesworld import ShapesWorld

    world = ShapesWorld(n, seed=0, res=pipe.native, categories=categories)
    captions = [world.scene(i).caption for i in range(n)]
    states = []
    with _bar(progress, n, "anchor captions") as done:
        for i in range(0, n, batch):
            states.append(encode_prompts(pipe.tokenizer, pipe.text_encoder, captions[i:i + batch]).half())
            if done:
                done(min(i + batch, n))
    c = pipe.fast_unet.config
    return Targets(torch.cat(states), torch.zeros(n, c.in_channels, c.sample_size, c.sample_size)), None


@contextmanager
def _bar(shown: bool, total: int, description: str):
    """A progress bar (None when not shown) as a callable taking the count done."""
    from .progress import start_progress

    if not shown:
        yield None
        return
    bar, task = start_progress(total, description, stderr=True)
    try:
        yield lambda k: bar.update(task, completed=k)
    finally:
        bar.stop()


def install(folder: Path, prior: MeanPrior, gain: float, record: dict) -> dict:
    """The prior into folder/mean_prior (written beside, renamed in) and the card: `gain` as the default,
    the record with the few-step UNet it was fitted to (its hash: `load` reports a prior gone stale)."""
    from .distill import _card
    from .files import atomic_write_text, publish_dir
    from .pipeline import FAST_UNET, model_hash

    sub = FAST_UNET if (folder / FAST_UNET).is_dir() else "unet"
    record = {"gain": gain, "unet": sub, "unet_hash": model_hash(folder, sub), **record}
    work = folder / f".{FOLDER}.partial"
    shutil.rmtree(work, ignore_errors=True)
    prior.register_to_config(_name_or_path=FOLDER)  # not the scratch folder it was loaded from
    prior.save_pretrained(work)
    card = _card(folder)
    card["generation"] = {**card.get("generation", {}), "mean_prior": gain}
    card["mean_prior"] = record
    publish_dir(work, folder / FOLDER)
    atomic_write_text(folder / "sfumato.json", json.dumps(card, indent=1, default=str))
    return record


__all__ = ["FOLDER", "MeanPrior", "Targets", "Variants", "centred", "contrast", "contrast_error",
           "first_step_targets", "fit", "for_pipeline", "fit_into", "held_out_error", "install", "layout_shift",
           "relation_targets", "split"]
