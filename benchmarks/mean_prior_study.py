"""The mean prior study of docs/recipe.md, round 17: the targets, the fits and the relation fit of the
shipped prior, step by step (`sfumato prior` runs the plain fit on one data set in one go).

    python benchmarks/mean_prior_study.py targets MODEL T0.pt --start 0 --stop 8000 [--category position]
    python benchmarks/mean_prior_study.py fit T0.pt,T1.pt,... P3 --steps 4000 [--lr 1e-3]
    python benchmarks/mean_prior_study.py clean MODEL C0.pt --seed 0 --prompts 967
    python benchmarks/mean_prior_study.py relations C0.pt,C1.pt P3 P7 --steps 1000 --weight 10
    python benchmarks/mean_prior_study.py attach MODEL P7 --gain 8

`targets`: pairs [start, stop) of the ShapesWorld training set (seed 0, the model's size; `--category`:
scenes of that category only), each pair's latent less the few-step UNet's first estimate from a
fresh noise (seeded by `--start`), centred (`mean_prior.first_step_targets`). `fit`: the plain
regression on their union (5 % of the pairs held out by id, as training holds them out). `clean`:
for `--prompts` position prompts drawn as the tuning draws them (none of the evaluations at seeds 0
and 1), each of the four relation variants' mean latent over 8 renders of its scenes (one render seed
for the four; ShapesWorld's grammar, read here in training only) less the model's mean first
estimate over 4 shared noises, centred. `relations`: from a fitted prior, batches of 16 prompts × 4
variants; the loss is the plain squared error plus `--weight` times the squared error of the prior's
contrast over the four variants (each output less the four's mean) against the targets'; the render
noise shared by the four cancels in the contrast, which the plain error leaves buried. `attach`: the
prior into MODEL/mean_prior, the card's default gain set, as `sfumato prior` writes it. One thread.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sfumato import mean_prior as mp  # noqa: E402


def targets(args) -> None:
    import sfumato
    from sfumato.data import _in_holdout, to_uint8_tensor
    from sfumato.shapesworld import ShapesWorld

    pipe = sfumato.load(args.model, onnx=False)
    ds = ShapesWorld(args.stop, seed=0, res=pipe.native, categories=(args.category,) if args.category else None)
    pairs = [ds[i] for i in range(args.start, args.stop)]
    t = mp.first_step_targets(pipe, [c for _, c, _ in pairs], to_uint8_tensor([i for i, _, _ in pairs]), args.start)
    held = torch.tensor([_in_holdout(f"{i:06d}", 0.05) for i in range(args.start, args.stop)])
    torch.save({"states": t.states, "res": t.residuals, "held": held}, args.out)


def load_targets(files: str) -> tuple[mp.Targets, np.ndarray]:
    ds = [torch.load(f) for f in files.split(",")]
    return (mp.Targets(torch.cat([d["states"] for d in ds]), torch.cat([d["res"] for d in ds])),
            torch.cat([d["held"] for d in ds]).numpy())


def fit(args) -> None:
    train, held = mp.split(*load_targets(args.targets))
    prior = mp.MeanPrior(text_width=train.states.shape[-1], latent_channels=train.residuals.shape[1],
                         sample_size=train.residuals.shape[-1])
    print(mp.fit(train, held, prior, args.steps, lr=args.lr), flush=True)
    prior.save_pretrained(args.out)


@torch.no_grad()
def clean(args) -> None:
    import sfumato
    from sfumato.first_step import relation_variants, render_means
    from sfumato.reward_tuning import few_step_policy, training_prompts
    from sfumato.sampling import encode_prompts
    from sfumato.shapesworld.checker import parse_prompt

    pipe = sfumato.load(args.model, onnx=False)
    policy, c = few_step_policy(pipe), pipe.fast_unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    prompts = training_prompts(random.Random(f"clean/{args.seed}"), args.prompts, ("position",))
    g, states, res = torch.Generator().manual_seed(args.seed), [], []
    for k, (_, text) in enumerate(prompts):
        variants = relation_variants(parse_prompt(text))
        data = render_means(pipe.vae, variants, 8, f"clean/{args.seed}/{k}", pipe.native)
        ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, [v.text for v in variants for _ in range(4)]).float()
        noise = torch.randn((4, *shape), generator=g).repeat(len(variants), 1, 1, 1)
        model = policy.denoised(pipe.fast_unet, noise, policy.timesteps[0], ctx).view(len(variants), 4, *shape).mean(1)
        states.append(ctx[::4].half())
        res.append(mp.centred(data - model))
    torch.save({"states": torch.cat(states), "res": torch.cat(res)}, args.out)


def relations(args) -> None:
    ds = [torch.load(f) for f in args.targets.split(",")]
    states, res = torch.cat([d["states"] for d in ds]), torch.cat([d["res"] for d in ds])
    groups = len(states) // 4
    states, res = states.view(groups, 4, *states.shape[1:]), res.view(groups, 4, *res.shape[1:])
    held = groups // 20  # the first 5 % of the prompts, for the held-out contrast error

    def contrast(x):
        return x - x.mean(1, keepdim=True)

    prior = mp.MeanPrior.from_pretrained(args.init)
    opt = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.01)
    rng, t0 = np.random.default_rng(0), time.time()
    for k in range(args.steps):
        idx = torch.from_numpy(rng.integers(held, groups, 16))
        out = prior(states[idx].flatten(0, 1).float()).view(res[idx].shape)
        loss = ((out - res[idx]) ** 2).mean() + args.weight * ((contrast(out) - contrast(res[idx])) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        if k % 100 == 0 or k == args.steps - 1:
            with torch.no_grad():
                own = prior(states[:held].flatten(0, 1).float()).view(res[:held].shape)
                err = ((contrast(own) - contrast(res[:held])) ** 2).mean().item()
            print(f"{k}: held-out contrast error {err:.4f} (none: {(contrast(res[:held]) ** 2).mean().item():.4f}), "
                  f"{time.time() - t0:.0f} s", flush=True)
    prior.save_pretrained(args.out)


def attach(args) -> None:
    mp.install(Path(args.model), mp.MeanPrior.from_pretrained(args.prior), args.gain,
               {"recipe": "benchmarks/mean_prior_study.py (docs/recipe.md, round 17)"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("targets")
    p.add_argument("model"), p.add_argument("out")
    p.add_argument("--start", type=int, default=0), p.add_argument("--stop", type=int, default=8000)
    p.add_argument("--category")
    p = sub.add_parser("fit")
    p.add_argument("targets"), p.add_argument("out")
    p.add_argument("--steps", type=int, default=4000), p.add_argument("--lr", type=float, default=1e-3)
    p = sub.add_parser("clean")
    p.add_argument("model"), p.add_argument("out")
    p.add_argument("--seed", type=int, default=0), p.add_argument("--prompts", type=int, default=960)
    p = sub.add_parser("relations")
    p.add_argument("targets"), p.add_argument("init"), p.add_argument("out")
    p.add_argument("--steps", type=int, default=1000), p.add_argument("--weight", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p = sub.add_parser("attach")
    p.add_argument("model"), p.add_argument("prior"), p.add_argument("--gain", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"targets": targets, "fit": fit, "clean": clean, "relations": relations, "attach": attach}[args.cmd](args)


if __name__ == "__main__":
    main()
