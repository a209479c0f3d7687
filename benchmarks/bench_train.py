"""UNet (and VAE) training throughput of a preset on this machine, with the options worth trying on a CPU.

    python benchmarks/bench_train.py [--preset small] [--steps 6] [--threads 2]

Prints samples/s for fp32 (the baseline), bf16 autocast, channels-last and torch.compile, each as a
ratio against the baseline measured in the same run.
"""

import argparse
import time

import torch

from sfumato.config import get_preset
from sfumato.models import build_unet, build_vae
from sfumato.vae import VaeTrainer


def unet_step_fn(cfg, bf16=False, channels_last=False, compile_=False):
    unet = build_unet(cfg, cfg.data.res // 4, cfg.clip.text_width)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    b = cfg.unet.batch_size
    x = torch.randn(b, cfg.vae.latent_channels, cfg.data.res // 4, cfg.data.res // 4)
    ctx = torch.randn(b, cfg.tokenizer.context_length, cfg.clip.text_width)
    t = torch.randint(0, 1000, (b,))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model = torch.compile(unet) if compile_ else unet

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, b


def vae_step_fn(cfg, bf16=False):
    vae = build_vae(cfg)
    trainer = VaeTrainer(vae, cfg.vae)
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    side = cfg.vae.crop or cfg.data.res
    x = torch.rand(cfg.vae.batch_size, 3, side, side) * 2 - 1

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = trainer(x)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, cfg.vae.batch_size


def rate(step, batch, steps):
    step()  # warm-up (and compilation)
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    print(f"preset {args.preset}, {args.threads} threads, torch {torch.__version__}")
    base = rate(*unet_step_fn(cfg), args.steps)
    print(f"unet fp32 (baseline)      {base:7.1f} samples/s  1.00x")
    variants = {"bf16 autocast": {"bf16": True}, "channels-last": {"channels_last": True}}
    if not args.skip_compile:
        variants["torch.compile"] = {"compile_": True}
    for name, kw in variants.items():
        try:
            r = rate(*unet_step_fn(cfg, **kw), args.steps)
            print(f"unet {name:<20} {r:7.1f} samples/s  {r / base:.2f}x")
        except Exception as e:  # e.g. no compiler toolchain for torch.compile
            print(f"unet {name:<20} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    vbase = rate(*vae_step_fn(cfg), args.steps)
    print(f"vae  fp32 (baseline)      {vbase:7.1f} samples/s  1.00x")
    r = rate(*vae_step_fn(cfg, bf16=True), args.steps)
    print(f"vae  bf16 autocast        {r:7.1f} samples/s  {r / vbase:.2f}x")


if __name__ == "__main__":
    main()
