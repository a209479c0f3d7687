"""Which autoencoder recipe reaches the scene checker's ceiling fastest on this CPU?

    python benchmarks/compare_vae_recipes.py [--seconds 200] [--threads 1] [--variants base,groups8,...]

The VAE caps everything the UNet can draw: a reconstruction the checker rejects can never be
generated right. Each variant trains from scratch on ShapesWorld (64 px) for the same wall-clock
budget, then prints held-out PSNR and the checker's pass rate on reconstructions of 256 renders.
"""

import argparse
import time

import torch

from sfumato.config import apply_overrides, get_preset
from sfumato.data import load_pairs_data, to_model_range
from sfumato.models import build_vae
from sfumato.evaluate import psnr
from sfumato.vae import VaeTrainer, checker_pass_rate, reconstruct

VARIANTS = {
    "base": [],  # the small preset as it stands
    "lr3e-3": ["vae.lr=3e-3"],
    "latent8": ["vae.latent_channels=8"],
    "groups8": ["vae.norm_groups=8"],
    "groups8-lr3e-3": ["vae.norm_groups=8", "vae.lr=3e-3"],
    "full64": ["vae.crop=0", "vae.batch_size=8"],
}


def run(name, overrides, data, seconds):
    cfg = apply_overrides(get_preset("small"), overrides)
    torch.manual_seed(0)
    vae = build_vae(cfg)
    trainer = VaeTrainer(vae, cfg.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    v, tr = cfg.vae, data.train_idx
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for group in opt.param_groups:
            group["lr"] = v.lr * min(1.0, (steps + 1) / v.warmup)
        x = data.images[torch.from_numpy(tr)[torch.randint(len(tr), (v.batch_size,), generator=g)].sort().values]
        if 0 < v.crop < x.shape[-1]:
            y0, x0 = torch.randint(x.shape[-1] - v.crop + 1, (2,), generator=g).tolist()
            x = x[..., y0:y0 + v.crop, x0:x0 + v.crop]
        loss, _ = trainer(to_model_range(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    idx = data.val_idx[:256]
    rec = reconstruct(vae, data.images[idx])
    rate = checker_pass_rate(rec, [data.captions[i] for i in idx])
    print(f"{name:16s} steps {steps:5d}  loss {loss.item():.4f}  psnr {psnr(data.images[idx], rec):5.2f} dB  "
          f"checker pass {rate:.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_pairs_data("shapesworld", get_preset("small").data, progress=False)
    print(f"{len(data.train_idx)} training pairs, {a.seconds:.0f} s per variant, {a.threads} thread(s)")
    for name in a.variants.split(","):
        run(name, VARIANTS[name], data, a.seconds)


if __name__ == "__main__":
    main()
