"""What the first step's mean layout is worth, and how much of it a model has (docs/recipe.md, rounds
16 to 18).

    python benchmarks/first_step_shift.py MODEL --seed 0 --gains 0,4,8      # position pass rates
    python benchmarks/first_step_shift.py MODEL --seed 1 --grid shift.png   # and a grid to look at
    python benchmarks/first_step_shift.py MODEL --shift mean --gains 0,1,2,4
    python benchmarks/first_step_shift.py MODEL --shift prior --gains 0,2,4,6  # the model's own mean prior
    python benchmarks/first_step_shift.py MODEL --shift prior --gains 0,8 --category counting
    python benchmarks/first_step_shift.py MODEL --shift prior --gains 8 --later 4,2   # at later steps too
    python benchmarks/first_step_shift.py MODEL --shift prior --gains 8 --shared-gain 0  # the relation's part only
    python benchmarks/first_step_shift.py MODEL OTHER --probe               # the contrast each one draws
    python benchmarks/first_step_shift.py MODEL --probe-prior               # its prior against the data's mean

Pass rates: for each position prompt of the evaluation at `--seed` (50), `--group` samples at default
settings (the few-step sampler), their first estimate moved by `gain` times a shift, then sampled on
with the same noises. Gain 0 is the model as it is. The shifts:

- `contrast`: the relation contrast of `sfumato.first_step` (the data's, from `--renders` renders per
  relation, less the model's own, over 32 shared noises);
- `mean`: the renders' plain mean latent (`--renders` × 2 of them) less the model's mean first estimate
  (32 noises), its per-channel mean over the canvas taken out: what an exact mean prior would give;
- `prior`: the model's own mean prior (`sfumato.mean_prior`; `generate --mean-prior` is this, and
  the other two read the prompt's scene and are never a generation path).

`--category` takes another category's prompts (with `prior` only; a prompt without a relation is
judged as the evaluation judges it). `--shared-gain`: the prior's output split into the relation's part
(less the mean over the prompt's four relation variants) and the shared part, scaled by `gain` and
`--shared-gain`: this reads the prompt's variants, so it is a diagnostic. `--later`: the same shift
added to the estimates of the next steps, with these gains.

`--probe`: for the first 20 of those prompts, the model's own relation contrast (its mean first
estimate under the prompt less the mean over the four relations, 32 shared noises) against the
data's (64 renders per relation): the cosine, and the projection in multiples of the data's
(`--objective mean` asks for `--gain`). `--probe-prior`: the model's mean prior against the `mean`
shift (64 renders) on the same prompts, likewise. One thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sfumato  # noqa: E402
from sfumato.evaluate import evaluation_prompts  # noqa: E402
from sfumato.first_step import data_contrast, model_contrast, relation_variants, render_means  # noqa: E402
from sfumato.mean_prior import centred, layout_shift  # noqa: E402
from sfumato.reward_tuning import few_step_policy, verdict_reward  # noqa: E402
from sfumato.sampling import decode_latents, encode_prompts  # noqa: E402
from sfumato.shapesworld.checker import parse_prompt  # noqa: E402


@torch.no_grad()
def own_contrast(pipe, policy, prompt, z: torch.Tensor) -> torch.Tensor:
    variants = relation_variants(prompt)
    ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [v.text for v in variants for _ in z]).float()
    est = policy.denoised(pipe.fast_unet.eval(), z.repeat(len(variants), 1, 1, 1), policy.timesteps[0], ctx)
    return model_contrast(est.view(len(variants), len(z), *z.shape[1:]))


@torch.no_grad()
def mean_shift(pipe, policy, prompt, text: str, z: torch.Tensor, renders: int, seed: str) -> torch.Tensor:
    """The renders' mean latent less the model's mean first estimate over the noises z, centred."""
    data = render_means(pipe.vae, [prompt], renders, seed, pipe.native)[0]
    ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [text] * len(z)).float()
    return centred(data - policy.denoised(pipe.fast_unet.eval(), z, policy.timesteps[0], ctx).mean(0))


@torch.no_grad()
def pass_rates(pipe, seed: int, gains: list[float], group: int, renders: int, grid: Path | None,
               kind: str = "contrast", category: str = "position", shared: float | None = None,
               later: tuple[float, ...] = ()) -> dict:
    c = pipe.fast_unet.config
    policy, shape = few_step_policy(pipe), (c.in_channels, c.sample_size, c.sample_size)
    prompts = [p for c, p in evaluation_prompts(50, seed) if c == category]
    rewards = {gain: [] for gain in gains}
    shown = []
    t0 = time.time()
    for k, text in enumerate(prompts):
        prompt = parse_prompt(text)
        g = torch.Generator().manual_seed(1000 * seed + k)
        ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [text] * group).float()
        if kind == "prior" and shared is not None:  # reads the prompt's variants: a diagnostic
            variants = encode_prompts(pipe.tokenizer, pipe.text_encoder, [v.text for v in relation_variants(prompt)])
            each = layout_shift(pipe.prior, variants.float(), 1.0, shape[1:])
            split = (each[0] - each.mean(0), each.mean(0))  # the relation's part, the shared part
        elif kind == "prior":
            shift = layout_shift(pipe.prior, ctx[:1], 1.0, shape[1:])
        elif kind == "mean":
            shift = mean_shift(pipe, policy, prompt, text, torch.randn((32, *shape), generator=g), 2 * renders,
                               f"first-step-shift/{seed}/{k}")
        else:
            shift = (data_contrast(pipe.vae, prompt, renders, f"first-step-shift/{seed}/{k}")
                     - own_contrast(pipe, policy, prompt, torch.randn((32, *shape), generator=g)))
        noises = [torch.randn((group, *shape), generator=g) for _ in policy.timesteps]
        first = policy.denoised(pipe.fast_unet, noises[0], policy.timesteps[0], ctx)
        for gain in gains:
            x = None
            if kind == "prior" and shared is not None:
                shift = split[0] + (shared / gain if gain else 0.0) * split[1]  # gain x relation + shared x the rest
            steps = (gain, *later) if gain else ()  # the gain of the shift at each step it moves
            for i, (t, t_next) in enumerate(zip(policy.timesteps, policy.timesteps[1:])):
                a = policy.alphas[t_next]
                est = first if i == 0 else policy.denoised(pipe.fast_unet, x, t, ctx)
                if i < len(steps):
                    est = est + steps[i] * shift
                x = a.sqrt() * est + (1 - a).sqrt() * noises[i + 1]
            images = decode_latents(pipe.vae, policy.denoised(pipe.fast_unet, x, policy.timesteps[-1], ctx)).numpy()
            judged = [verdict_reward(image, prompt, 0.5)[0] for image in images]
            rewards[gain] += judged
            if grid is not None and k < 10:
                shown += [(image, f"x{gain:g}: {text}", r == 1) for image, r in zip(images[:3], judged)]
        if (k + 1) % 10 == 0:
            print(f"{k + 1} prompts, {time.time() - t0:.0f} s: " + ", ".join(
                f"x{gain:g} {np.mean([r == 1 for r in v]):.3f}" for gain, v in rewards.items()), flush=True)
    if grid is not None:
        from PIL import Image

        from sfumato.viz import make_grid

        make_grid([Image.fromarray(i) for i, _, _ in shown], [c for _, c, _ in shown], cols=3 * len(gains), cell=96,
                  marks=[m for _, _, m in shown]).save(grid)
    return {gain: {"pass": float(np.mean([r == 1 for r in v])), "objects_right": float(np.mean([r >= 0.5 for r in v])),
                   "samples": len(v)} for gain, v in rewards.items()}


@torch.no_grad()
def probe(models: list[str]) -> None:
    prompts = [parse_prompt(p) for c, p in evaluation_prompts(50, 0) if c == "position"][:20]
    data = None
    for name in models:
        pipe = sfumato.load(name, onnx=False)
        if data is None:
            data = [data_contrast(pipe.vae, p, 64, f"first-step-probe/{k}") for k, p in enumerate(prompts)]
        policy, cos, proj = few_step_policy(pipe), [], []
        c = pipe.fast_unet.config
        for k, p in enumerate(prompts):
            g = torch.Generator().manual_seed(k)
            z = torch.randn((32, c.in_channels, c.sample_size, c.sample_size), generator=g)
            own, want = own_contrast(pipe, policy, p, z).flatten(), data[k].flatten()
            cos.append(torch.nn.functional.cosine_similarity(own, want, 0).item())
            proj.append((own @ want / (want @ want)).item())
        print(f"{name}: cosine {np.mean(cos):.3f}, projection {np.mean(proj):.3f} x the data's contrast", flush=True)


@torch.no_grad()
def probe_prior(name: str) -> None:
    pipe = sfumato.load(name, onnx=False)
    if pipe.prior is None:
        raise SystemExit(f"{name} has no mean prior (sfumato prior MODEL)")
    policy, cos, proj = few_step_policy(pipe), [], []
    c = pipe.fast_unet.config
    for k, (_, text) in enumerate([p for p in evaluation_prompts(50, 0) if p[0] == "position"][:20]):
        g = torch.Generator().manual_seed(k)
        z = torch.randn((32, c.in_channels, c.sample_size, c.sample_size), generator=g)
        want = mean_shift(pipe, policy, parse_prompt(text), text, z, 64, f"first-step-probe/{k}").flatten()
        ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [text]).float()
        own = layout_shift(pipe.prior, ctx, 1.0, tuple(z.shape[-2:])).flatten()
        cos.append(torch.nn.functional.cosine_similarity(own, want, 0).item())
        proj.append((own @ want / (want @ want)).item())
    print(f"{name}: mean prior against the data's mean less the model's: cosine {np.mean(cos):.3f}, "
          f"projection {np.mean(proj):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gains", default="0,4,8")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--renders", type=int, default=16)
    ap.add_argument("--grid", type=Path)
    ap.add_argument("--shift", choices=("contrast", "mean", "prior"), default="contrast")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--probe-prior", action="store_true")
    ap.add_argument("--category", default="position", help="the evaluation's prompts of this category (prior only)")
    ap.add_argument("--shared-gain", type=float, help="prior only: the gains scale the relation's part of the "
                    "prior (its output less the mean over the prompt's relation variants), this the rest")
    ap.add_argument("--later", default="", help="gains of the same shift at the steps after the first, e.g. 4,2")
    args = ap.parse_args()
    if args.shift != "prior" and (args.category != "position" or args.shared_gain is not None):
        ap.error("--category and --shared-gain go with --shift prior")
    torch.set_num_threads(1)
    if args.probe:
        probe(args.models)
        return
    if args.probe_prior:
        for name in args.models:
            probe_prior(name)
        return
    for name in args.models:
        results = pass_rates(sfumato.load(name, onnx=False), args.seed, [float(g) for g in args.gains.split(",")],
                             args.group, args.renders, args.grid, args.shift, args.category, args.shared_gain,
                             tuple(float(g) for g in args.later.split(",") if g))
        how = f"{args.category} {args.shift}" + (f" shared {args.shared_gain:g}" if args.shared_gain is not None else "")
        for gain, r in results.items():
            print(f"{name} seed {args.seed} {how} gain {gain:g}{',' + args.later if args.later and gain else ''}: "
                  f"pass {r['pass']:.3f}, "
                  f"objects right {r['objects_right']:.3f} "
                  f"({r['samples']} samples)")


if __name__ == "__main__":
    main()
