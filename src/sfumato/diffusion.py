"""The latent diffusion stage: a UNet denoises VAE latents, reading frozen text states by cross-attention.

Latents (posterior mean and std) and text states are computed once and cached in memory; each step
samples a latent from the cached posterior. Training core after diffusers'
examples/text_to_image/train_text_to_image.py: noise, add_noise, epsilon or v target, min-SNR-gamma.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from .data import PairData, to_model_range
from .engine import StageSpec
from .sampling import prompt_ids
from .token_grounding import grounding_loss, recording_attention

# Noise bands whose loss is logged separately: layout is decided at high noise, detail at low.
BANDS = {"low": (0.0, 0.3), "mid": (0.3, 0.7), "high": (0.7, 1.0)}


@torch.no_grad()
def cache_latents(vae, images_u8: torch.Tensor, batch_size: int = 128, progress: bool = True):
    """Posterior mean and std of every image, float16 on the CPU: (N, C, r, r) each."""
    vae.eval()
    means, stds = [], []
    it = range(0, len(images_u8), batch_size)
    for i in track(it, description="caching latents", transient=True) if progress else it:
        d = vae.encode(to_model_range(images_u8[i:i + batch_size]).to(vae.device)).latent_dist
        means.append(d.mean.half().cpu())
        stds.append(d.std.half().cpu())
    return torch.cat(means), torch.cat(stds)


def caption_ids(tokenizer, captions: list[str]):
    """Token ids of each distinct caption (U, L), the row of each caption, and the empty prompt's ids
    (1, L): what cache_text encodes, and what LatentBatches reads when the text tower trains with
    the UNet."""
    unique = list(dict.fromkeys(captions))
    row = {c: i for i, c in enumerate(unique)}
    ids = prompt_ids(tokenizer, unique + [""])
    return ids[:-1], torch.tensor([row[c] for c in captions]), ids[-1:]


@torch.no_grad()
def cache_text(tokenizer, text_encoder, captions: list[str], batch_size: int = 256):
    """Text states of each distinct caption (U, L, D) float16, and the row of each caption."""
    ids, rows, empty_ids = caption_ids(tokenizer, captions)
    states = [text_encoder(ids[i:i + batch_size].to(text_encoder.device))[0].half().cpu()
              for i in range(0, len(ids), batch_size)]
    empty = text_encoder(empty_ids.to(text_encoder.device))[0].half().cpu()
    return torch.cat(states), rows, empty


def snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v; Hang et al. (2023)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def posterior_sample(latents, idx, g: torch.Generator, scaling: float) -> torch.Tensor:
    """A draw from the cached VAE posteriors (mean, std) of pairs idx, scaled for the UNet."""
    mean, std = latents
    idx = torch.as_tensor(idx)
    return (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)) * scaling


class PromptUNet(torch.nn.Module):
    """The UNet with the text tower in front, reading token ids instead of states: both then train
    through one forward (and one distributed wrapper), and the training loss code stays the UNet's."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=self.text_encoder(encoder_hidden_states)[0])


class LatentBatches:
    """Draws training batches (noisy latents, timesteps, text states, targets) from the caches.

    `text` is (states, rows, empty) from cache_text; or (ids, rows, empty_ids) from caption_ids when
    the text tower trains along: batches then carry token ids, for a PromptUNet. `grounding` is
    (assign, boxes, image_px) from token_grounding.grounding_targets, for the grounding loss.
    `negatives` (N, K) are rows of the text table that contradict each pair's caption (-1: none),
    from relation_negatives, for the relation-contrast loss."""

    def __init__(self, cfg, scheduler, latents, text, scaling: float, grounding=None, negatives=None):
        self.u, self.scheduler, self.scaling = cfg.unet, scheduler, scaling
        self.mean, self.std = latents
        self.states, self.rows, self.empty = text
        self.grounding = grounding
        self.negatives = negatives

    def context(self, rows: torch.Tensor) -> torch.Tensor:
        """What the UNet (or the PromptUNet) reads for these text-table rows: states, or token ids."""
        ctx = self.states[rows]
        return ctx.float() if ctx.is_floating_point() else ctx  # cached states are float16

    def timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Training noise levels, drawn as `unet.timestep_sampling` says."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        T = self.scheduler.config.num_train_timesteps
        if self.u.timestep_sampling == "uniform":
            return torch.randint(0, T, (n,), generator=g)
        u = compute_density_for_timestep_sampling(self.u.timestep_sampling, n, logit_mean=self.u.logit_mean,
                                                  logit_std=self.u.logit_std, generator=g)
        if self.u.uniform_share > 0:
            swap = torch.rand(n, generator=g) < self.u.uniform_share
            u = torch.where(swap, torch.rand(n, generator=g), u)
        return (u * T).long().clamp(0, T - 1)

    def draw(self, idx: np.ndarray, g: torch.Generator, device, t: torch.Tensor | None = None, dropout=None,
             with_keep: bool = False):
        """(noisy, t, text, target), and with `with_keep` which pairs kept their caption."""
        n = len(idx)
        z = posterior_sample((self.mean, self.std), idx, g, self.scaling)
        noise = torch.randn(z.shape, generator=g)
        if t is None:
            t = self.timesteps(n, g)
        noisy = self.scheduler.add_noise(z, noise, t)
        target = noise if self.u.prediction_type == "epsilon" else self.scheduler.get_velocity(z, noise, t)
        ctx = self.context(self.rows[idx])
        p = self.u.caption_dropout if dropout is None else dropout
        drop = torch.rand(n, generator=g) < p if p > 0 else torch.zeros(n, dtype=torch.bool)
        ctx[drop] = self.empty.to(ctx.dtype)
        out = noisy.to(device), t.to(device), ctx.to(device), target.to(device)
        return (*out, ~drop) if with_keep else out


def unet_loss(model, batches: LatentBatches, train_idx: np.ndarray, g: torch.Generator, device,
              weights: torch.Tensor | None = None):
    """One training batch's loss (and its MSE per noise band, for the log); `weights` (one per
    training pair) makes some pairs more likely than others."""
    u, scheduler = batches.u, batches.scheduler
    T = scheduler.config.num_train_timesteps
    pick = (torch.randint(len(train_idx), (u.batch_size,), generator=g) if weights is None
            else torch.multinomial(weights, u.batch_size, replacement=True, generator=g))
    idx = train_idx[pick.numpy()]
    noisy, t, ctx, target, keep = batches.draw(idx, g, device, with_keep=True)
    grounded = batches.grounding is not None and u.grounding_weight > 0
    with recording_attention(_bare_unet(model)) if grounded else contextlib.nullcontext() as rec:
        pred = model(noisy, t, encoder_hidden_states=ctx).sample
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    w = snr_weights(scheduler, t.cpu(), u.snr_gamma).to(per.device) if u.snr_gamma > 0 else 1.0
    logs = {}
    for name, (lo, hi) in BANDS.items():
        m = (t >= lo * T) & (t < hi * T)
        if m.any():
            logs[f"mse_{name}"] = per[m].mean().detach()
    loss = (per * w).mean()
    if grounded:
        assign, boxes, image_px = batches.grounding
        tidx = torch.as_tensor(idx)
        ground = grounding_loss(rec.probs, assign[tidx], boxes[tidx], image_px, keep & (t.cpu() >= u.grounding_min_t))
        logs["grounding"] = ground.detach()
        loss = loss + u.grounding_weight * ground.to(loss.device)
    if u.relation_contrast > 0 and batches.negatives is not None:
        # The same noisy latents under a caption with another relation should be denoised worse, by
        # a margin: the diffusion loss alone hardly tells the relations apart (docs/recipe.md).
        neg = batches.negatives[torch.as_tensor(idx)]
        sel = torch.nonzero((neg >= 0).any(1) & keep.cpu() & (t.cpu() >= u.contrast_min_t))[:, 0]
        if len(sel):
            pick = torch.multinomial((neg[sel] >= 0).float(), 1, generator=g)[:, 0]
            ctx_neg = batches.context(neg[sel, pick]).to(device)
            s = sel.to(device)
            pred_neg = model(noisy[s], t[s], encoder_hidden_states=ctx_neg).sample
            per_neg = F.mse_loss(pred_neg.float(), target[s].float(), reduction="none").mean(dim=(1, 2, 3))
            contrast = F.relu(per[s] * (1 + u.contrast_margin) - per_neg).mean()
            logs["contrast"] = contrast.detach()
            logs["contrast_gap"] = (per_neg / per[s]).mean().detach() - 1
            loss = loss + u.relation_contrast * contrast
    return loss, logs


def relation_negatives(tokenizer, captions: list[str], text, text_encoder=None):
    """The text table (table, rows, empty) grown by each distinct caption's other-relation captions
    (clip.other_relations), and (N, 3) rows of them per pair, -1 where a caption names no relation.
    The table holds token ids, or the states of `text_encoder` when one is given (a frozen tower)."""
    from .clip import other_relations

    table, rows, empty = text
    unique = list(dict.fromkeys(captions))
    negs = {c: other_relations(c) for c in unique}
    extra = list(dict.fromkeys(n for ns in negs.values() for n in ns))
    at = {c: len(table) + i for i, c in enumerate(extra)}
    if extra:
        grown = (cache_text(tokenizer, text_encoder, extra)[0] if text_encoder is not None
                 else prompt_ids(tokenizer, extra))
        table = torch.cat([table, grown.to(table.dtype)])
    per_caption = torch.full((len(unique), 3), -1, dtype=torch.long)
    for i, c in enumerate(unique):
        for k, n in enumerate(negs[c][:3]):
            per_caption[i, k] = at[n]
    return (table, rows, empty), per_caption[rows]


def _bare_unet(model):
    """The UNet inside a distributed wrapper and/or a PromptUNet."""
    model = getattr(model, "module", model)
    return getattr(model, "unet", model)


def unet_stage(cfg, data: PairData, unet, scheduler, batches: LatentBatches, engine, sample_fn) -> StageSpec:
    """sample_fn(step) writes a grid of the fixed prompts and returns its metrics (main process).
    `unet` is the UNet, or a PromptUNet when the text tower trains along."""
    u = cfg.unet
    train_idx = data.train_idx

    def loss_fn(model, g):
        return unet_loss(model, batches, train_idx, g, engine.device)

    def eval_fn(step):
        return {**band_metrics(unet, data, batches, engine.device), **sample_fn(step)}

    return StageSpec("unet", unet, loss_fn, u.steps, u.lr, u.warmup, u.batch_size, eval_fn=eval_fn,
                     ema=make_ema(unet, u), lr_scales={"text_encoder.": u.text_encoder_lr / u.lr})


def make_ema(unet, u):
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=u.ema_decay, use_ema_warmup=u.ema_warmup, inv_gamma=1.0, power=2 / 3)


@torch.no_grad()
def band_metrics(unet, data: PairData, batches: LatentBatches, device, n: int = 256) -> dict[str, float]:
    """Held-out x0-space error per noise band, conditional and unconditional.

    A gap between the two at high noise is what classifier-free guidance amplifies; no gap there
    means the prompt cannot steer layout.
    """
    unet.eval()
    idx = data.val_idx[:n]
    if len(idx) == 0:
        return {}
    T = batches.scheduler.config.num_train_timesteps
    ac = batches.scheduler.alphas_cumprod
    out = {}
    for name, (lo, hi) in BANDS.items():
        g = torch.Generator().manual_seed(1234)
        t = torch.full((len(idx),), int((lo + hi) / 2 * T))
        errs = {}
        for mode, dropout in (("cond", 0.0), ("uncond", 1.0)):
            g.manual_seed(1234)
            noisy, tt, ctx, target = batches.draw(idx, g, device, t=t, dropout=dropout)
            pred = unet(noisy, tt, encoder_hidden_states=ctx).sample.float()
            a = ac[t].view(-1, 1, 1, 1).to(device)
            x0_true = predicted_x0(batches.u.prediction_type, noisy, target, a)
            x0_pred = predicted_x0(batches.u.prediction_type, noisy, pred, a)
            errs[mode] = float(F.mse_loss(x0_pred, x0_true))
        out[f"x0_mse_{name}_cond"] = errs["cond"]
        out[f"x0_mse_{name}_gap"] = errs["uncond"] - errs["cond"]
    unet.train()
    return out


def predicted_x0(prediction_type: str, noisy, pred, a):
    """x0 from the UNet's prediction at cumulative alpha a (epsilon or v)."""
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt().clamp(min=1e-4)
    return a.sqrt() * noisy - (1 - a).sqrt() * pred  # from v


def predicted_eps(prediction_type: str, noisy, pred, a):
    """The noise from the UNet's prediction at cumulative alpha a (epsilon or v)."""
    if prediction_type == "epsilon":
        return pred
    return a.sqrt() * pred + (1 - a).sqrt() * noisy  # from v


def ema_copy(unet, ema):
    """A copy of the UNet holding the EMA weights (for sampling and saving)."""
    m = copy.deepcopy(unet)
    ema.copy_to(m.parameters())
    return m


__all__ = ["cache_latents", "cache_text", "caption_ids", "PromptUNet", "LatentBatches", "unet_loss", "unet_stage", "ema_copy", "band_metrics", "predicted_x0",
           "predicted_eps", "posterior_sample"]
