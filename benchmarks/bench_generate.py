"""Seconds per image: sfumato's generate() against plain diffusers on the same weights.

    python benchmarks/bench_generate.py [--model DIR] [--n 20] [--fast DIR]

Sides, all on the same folder at its native size, after one warm-up call each:
  default    sfumato with the folder's own defaults (a model carrying a distilled UNet: LCM, few steps)
             and its ONNX export where it has one (`sfumato export`);
  search     the same with layout search over 8 noises (sfumato.layout; the default prompt names a
             relation, so this is what the search costs);
  torch      the same settings with PyTorch modules only (what the export buys);
  full       sfumato's full sampler on the folder's own UNet (DPM++ 2M, 20 steps, CFG), PyTorch
             (only for a folder that carries a distilled UNet: otherwise it is `default`);
  diffusers  StableDiffusionPipeline.from_pretrained(model)(prompt): the folder's own scheduler,
             50 steps at guidance 7.5 (diffusers loads unet/, never a carried unet_lcm/).
Each side runs in its own child process so that its peak RSS (resource.getrusage) is its own; sfumato
sides also report images/s when 16 images are drawn in one batch. With --fast (a separate `sfumato
distill --out` folder of the same model) that folder runs too, with its own defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
SRC = Path(__file__).resolve().parents[1] / "src"

PROMPT = "a red circle to the left of a blue square"


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _worker(kind: str, model: str, n: int, prompt: str) -> dict:
    """kind: default, torch, full (sfumato) or diffusers."""
    import inspect
    import warnings

    import torch

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    if kind != "diffusers":
        import sfumato
        from sfumato.config import DEFAULT_SCHEDULER

        pipe = sfumato.load(model, onnx=False if kind not in ("default", "search") else None)
        device, size = pipe.device, pipe.native
        ask = {"scheduler": pipe.full_defaults.get("scheduler", DEFAULT_SCHEDULER)} if kind == "full" else {}
        ask = {"layout_search": 8} if kind == "search" else ask
        base = pipe.settings(prompt, **ask)  # the folder's own defaults
        steps, cfg, sampler = base.steps, base.guidance, base.scheduler
        sampler += " (ONNX)" if pipe.graphs else ""

        def one(i: int):
            return pipe.generate(pipe.settings(prompt, seed=i, **ask))[0]

        def batch16() -> float:
            t = time.perf_counter()
            pipe.generate(pipe.settings(prompt, seed=0, **ask), n=16)
            return 16 / (time.perf_counter() - t)
    else:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        params = inspect.signature(pipe.__call__).parameters
        steps, cfg = params["num_inference_steps"].default, params["guidance_scale"].default

        sampler = type(pipe.scheduler).__name__

        def one(i: int):
            g = torch.Generator(device).manual_seed(i)
            return pipe(prompt, height=size, width=size, generator=g).images[0]  # defaults: 50 steps, 7.5

        batch16 = None
    load_s = time.perf_counter() - t0
    img = one(10_000)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        one(i)
    _sync(device)
    per_image = (time.perf_counter() - t0) / n
    images_per_s_16 = batch16() if batch16 else None
    gpu = torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None
    return {"kind": kind, "device": str(device), "size": list(img.size), "steps": steps, "guidance": cfg,
            "sampler": sampler, "load_s": load_s, "images_per_s_batch16": images_per_s_16,
            "s_per_image": per_image, "peak_rss_mib": _peak_rss_mib(), "peak_gpu_mib": gpu,
            "torch_threads": torch.get_num_threads()}


def _run_child(kind: str, args, model=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model or args.model), "--n", str(args.n),
           "--prompt", args.prompt]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{kind} run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="diffusers SD folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=20, help="timed images per side (after one warm-up)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--fast", type=Path, default=None, help="a distilled folder of the same model, run with its defaults")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--worker", choices=("default", "search", "torch", "full", "diffusers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")
    if args.worker:
        print(json.dumps(_worker(args.worker, str(args.model), args.n, args.prompt)))
        return
    if args.model is None:
        sys.path.insert(0, str(SRC))
        from sfumato.pipeline import DEFAULT_MODEL

        if not DEFAULT_MODEL.is_dir():
            ap.error(f"the shipped default model is missing ({DEFAULT_MODEL}); pass --model DIR")
        args.model = DEFAULT_MODEL
    if not args.model.is_dir():
        ap.error(f"--model {args.model} is not a folder")

    sides = ["default", "search", "torch"]
    if (args.model / "unet_lcm").is_dir():
        sides.append("full")
    res = {k: _run_child(k, args) for k in (*sides, "diffusers")}
    if args.fast:
        res["fast"] = {**_run_child("default", args, args.fast), "kind": "fast"}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    s, d = res["default"], res["diffusers"]
    print(f"model {args.model}  ({s['size'][0]}x{s['size'][1]} px, {s['device']}, "
          f"{s['torch_threads']} torch threads, n={args.n} after 1 warm-up)")
    print(f"{'':10} {'sampler':>29} {'steps':>5} {'CFG':>4} {'s/image':>9} {'s/step':>8} {'load s':>7} "
          f"{'peak RSS MiB':>13} {'img/s @16':>9}" + (" peak GPU MiB" if s["peak_gpu_mib"] else ""))
    for r in res.values():
        gpu = f" {r['peak_gpu_mib']:12.0f}" if r["peak_gpu_mib"] else ""
        b16 = f"{r['images_per_s_batch16']:9.1f}" if r["images_per_s_batch16"] else f"{'-':>9}"
        print(f"{r['kind']:10} {r['sampler']:>29} {r['steps']:5d} {r['guidance']:4g} {r['s_per_image']:9.4f} "
              f"{r['s_per_image'] / r['steps']:8.4f} {r['load_s']:7.2f} {r['peak_rss_mib']:13.1f} {b16}{gpu}")
    for r in res.values():
        if r is not d:
            print(f"ratio {r['kind']} / diffusers: {r['s_per_image'] / d['s_per_image']:.3f} "
                  f"(diffusers takes {d['s_per_image'] / r['s_per_image']:.1f}x as long per image)")


if __name__ == "__main__":
    main()
