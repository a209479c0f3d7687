"""The mean prior study of docs/recipe.md, rounds 17 and 18: the targets and the fits, step by step
(`sfumato prior` runs the shipped fit, the relation's contrast alone, in one go).

    python benchmarks/mean_prior_study.py targets MODEL T0.pt --start 0 --stop 8000 [--category position]
    python benchmarks/mean_prior_study.py fit T0.pt,T1.pt,... P3 --steps 4000 [--lr 1e-3]
    python benchmarks/mean_prior_study.py fit T0.pt,... P9 --steps 4000 --relations C0.pt,C1.pt [--plain-scale 0]
    python benchmarks/mean_prior_study.py fit T0.pt,T1.pt,T2.pt,T3.pt P10 --steps 1500 --relations C0.pt,C1.pt \
        --plain-scale 0 --anchors-without-relations                        # the shipped prior
    python benchmarks/mean_prior_study.py clean MODEL C0.pt --seed 0 --prompts 967
    python benchmarks/mean_prior_study.py relations C0.pt,C1.pt P3 P7 --steps 1000 --weight 10
    python benchmarks/mean_prior_study.py attach MODEL P10 --gain 8

`targets`: pairs [start, stop) of the ShapesWorld training set (seed 0, the model's size; `--category`:
scenes of that category only), each pair's latent less the few-step UNet's first estimate from a
fresh noise (seeded by `--start`), centred (`mean_prior.first_step_targets`). `fit`: the plain
regression on their union (5 % of the pairs held out by id, as training holds them out); with
`--relations`, the joint fit on the pairs and the variant groups of `clean` (`mean_prior.fit`), and
with `--plain-scale 0` the relation's contrast alone, the pairs' captions held at zero (round 18,
which `sfumato prior` runs). `clean`: `mean_prior.relation_targets` for `--prompts` position prompts
(none of the evaluations at seeds 0 and 1): each of the four relation variants' mean latent over 8
renders of its scenes (one render seed for the four; ShapesWorld's grammar, read here in training
only) less the model's mean first estimate over 4 shared noises, centred. `relations`: from a fitted prior, batches of 16 prompts × 4
variants; the loss is the plain squared error plus `--weight` times the squared error of the prior's
contrast over the four variants (each output less the four's mean) against the targets'; the render
noise shared by the four cancels in the contrast, which the plain error leaves buried. `attach`: the
prior into MODEL/mean_prior, the card's default gain set, as `sfumato prior` writes it. One thread.
"""

from __future__ import annotations

import argparse
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
    targets, held = load_targets(args.targets)
    if args.anchors_without_relations:  # the files are pairs 0, 1, 2, ... of the standard mix, in order
        from sfumato.shapesworld import ShapesWorld

        world = ShapesWorld(len(held), seed=0)
        keep = torch.tensor([world.scene(i).category != "position" for i in range(len(held))])
        targets, held = mp.Targets(targets.states[keep], targets.residuals[keep]), held[keep.numpy()]
    train, held = mp.split(targets, held)
    prior = mp.MeanPrior(text_width=train.states.shape[-1], latent_channels=train.residuals.shape[1],
                         sample_size=train.residuals.shape[-1])
    variants = load_variants(args.relations) if args.relations else None
    t0 = time.time()

    def show(k, loss):
        if k % 200 == 0:
            print(f"{k}: loss {loss:.4f}, {time.time() - t0:.0f} s", flush=True)

    print(mp.fit(train, held, prior, args.steps, lr=args.lr, variants=variants, weight=args.weight, progress=show,
                 plain_scale=args.plain_scale), flush=True)
    prior.save_pretrained(args.out)


def clean(args) -> None:
    import sfumato

    v = mp.relation_targets(sfumato.load(args.model, onnx=False), args.prompts, args.seed)
    torch.save({"states": v.states.flatten(0, 1), "res": v.residuals.flatten(0, 1)}, args.out)


def load_variants(files: str) -> mp.Variants:
    ds = [torch.load(f) for f in files.split(",")]
    states, res = torch.cat([d["states"] for d in ds]), torch.cat([d["res"] for d in ds])
    return mp.Variants(states.view(-1, 4, *states.shape[1:]), res.view(-1, 4, *res.shape[1:]))


def relations(args) -> None:
    v = load_variants(args.targets)
    states, res, groups, contrast = v.states, v.residuals, len(v), mp.contrast
    held = groups // 20  # the first 5 % of the prompts, for the held-out contrast error

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
               {"recipe": "benchmarks/mean_prior_study.py (docs/recipe.md, rounds 17 and 18)"})


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
    p.add_argument("--relations", help="variant targets of `clean` (comma-separated): the joint fit")
    p.add_argument("--weight", type=float, default=10.0)
    p.add_argument("--plain-scale", type=float, default=1.0, help="0: the pairs are zero anchors (round 18)")
    p.add_argument("--anchors-without-relations", action="store_true",
                   help="leave out the pairs that name a relation (files of `targets` from pair 0 on, no --category)")
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
