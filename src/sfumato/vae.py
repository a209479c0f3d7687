"""The autoencoder stage: diffusers' AutoencoderKL trained on L1 + MSE + a small KL term.

Its held-out PSNR and, on ShapesWorld captions, the scene checker's pass rate on its reconstructions
are the ceiling of everything the UNet can draw, so both are measured at every validation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import PairData, from_model_range, to_model_range
from .engine import StageSpec
from .evaluate import psnr

EVAL_IMAGES = 512


class VaeTrainer(torch.nn.Module):
    def __init__(self, vae, cfg):
        super().__init__()
        self.vae, self.cfg = vae, cfg

    def forward(self, x):
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()  # per pixel, so kl_weight does not depend on resolution
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        loss = self.cfg.l1_weight * l1 + self.cfg.mse_weight * mse + self.cfg.kl_weight * kl
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def reconstruct(vae, images_u8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> reconstructed uint8 (N, 3, R, R), through the posterior mean."""
    vae.eval()
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = to_model_range(images_u8[i:i + batch_size]).to(vae.device)
        z = vae.encode(x).latent_dist.mode()
        out.append(from_model_range(vae.decode(z).sample).cpu())
    return torch.cat(out)


def checker_pass_rate(images_u8: torch.Tensor, captions: list[str]) -> float | None:
    """Share of images the ShapesWorld checker accepts for their caption; None if no caption parses."""
    from PIL import Image

    from .shapesworld.checker import judge

    passed = judged = 0
    for img, cap in zip(images_u8, captions):
        try:
            v = judge(Image.fromarray(img.permute(1, 2, 0).numpy()), cap)
        except ValueError:  # not a ShapesWorld caption
            continue
        judged += 1
        passed += bool(v.passed)
    return passed / judged if judged else None


def vae_metrics(vae, data: PairData) -> dict[str, float]:
    idx = data.val_idx[:EVAL_IMAGES]
    orig = data.images[idx]
    rec = reconstruct(vae, orig)
    out = {"vae_psnr": psnr(orig, rec)}
    rate = checker_pass_rate(rec, [data.captions[i] for i in idx])
    if rate is not None:
        out["vae_checker_pass"] = rate
        out["data_checker_pass"] = checker_pass_rate(orig, [data.captions[i] for i in idx])
    return out


@torch.no_grad()
def fit_scaling_factor(vae, data: PairData, n: int = 1024) -> float:
    """1 / std of training latents, so the UNet sees unit-variance inputs (as Stable Diffusion's 0.18215)."""
    idx = data.train_idx[:n]
    z = [vae.encode(to_model_range(data.images[idx[i:i + 128]]).to(vae.device)).latent_dist.mode()
         for i in range(0, len(idx), 128)]
    return float(1.0 / torch.cat(z).float().std())


def vae_stage(cfg, data: PairData, vae, engine) -> StageSpec:
    v = cfg.vae
    train_idx = data.train_idx

    def loss_fn(model, g):
        idx = train_idx[torch.randint(len(train_idx), (v.batch_size,), generator=g).numpy()]
        x = data.images[np.sort(idx)]
        if 0 < v.crop < x.shape[-1]:
            y0, x0 = torch.randint(x.shape[-1] - v.crop + 1, (2,), generator=g).tolist()
            x = x[..., y0:y0 + v.crop, x0:x0 + v.crop]
        return model(to_model_range(x).to(engine.device))

    def eval_fn(step):
        return vae_metrics(vae, data)

    trainer = VaeTrainer(vae, v)
    return StageSpec("vae", trainer, loss_fn, v.steps, v.lr, v.warmup, v.batch_size, eval_fn=eval_fn)
