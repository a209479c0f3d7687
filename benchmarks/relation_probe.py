"""Can a UNet place objects by a relation? Two measures on held-out position renders, no sampling.

    python benchmarks/relation_probe.py --model MODEL [--n 96]

- **where**: a linear probe (ridge, 3/4 of the renders to fit, 1/4 to test) of each cell's column
  and row from the input of every cross-attention layer: R^2 near 1 means that layer's queries can
  know where they are, near 0 that they cannot, and then "to the left of" cannot steer attention.
- **own / other**: the share of each object word's cross-attention (8x8 and 4x4 layers, heads
  averaged) inside its own object's box and inside the other object's box, with the true caption and
  with the relation flipped ("left of" <-> "right of", "above" <-> "below"). A UNet that reads the
  relation moves its attention when the relation flips, most at high noise where layout is decided.

Renders: ShapesWorld position scenes, seed 4242 (not in the training set); one thread.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

def ridge_r2(x: np.ndarray, y: np.ndarray, n_fit: int) -> float:
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    w = np.linalg.solve(x[:n_fit].T @ x[:n_fit] + 1e-2 * np.eye(x.shape[1]), x[:n_fit].T @ y[:n_fit])
    err = x[n_fit:] @ w - y[n_fit:]
    return float(1 - (err ** 2).sum() / ((y[n_fit:] - y[n_fit:].mean()) ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: the shipped default model)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--timesteps", default="950,850,700,500")
    args = p.parse_args()

    from sfumato.clip import flip_relation
    from sfumato.data import to_model_range
    from sfumato.pipeline import load
    from sfumato.sampling import prompt_ids
    from sfumato.shapesworld import ShapesWorld
    from sfumato.token_grounding import grounding_targets, recording_attention, token_masks

    torch.set_num_threads(1)
    pipe = load(args.model)
    unet, vae, tok, tower = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler_config)
    n = args.n
    ds = ShapesWorld(n, seed=4242, res=64, categories=("position",))
    items = [ds[i] for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _, _ in items])
    records = [rec for _, _, rec in items]
    captions = {"true": [c for _, c, _ in items]}
    captions["flipped"] = [flip_relation(c) for c in captions["true"]]
    if None in captions["flipped"]:
        raise SystemExit("a position caption without a relation: the renders are not what this probe expects")
    with torch.no_grad():
        z = vae.encode(to_model_range(images)).latent_dist.mean * vae.config.scaling_factor
        ctx = {k: tower(prompt_ids(tok, v))[0] for k, v in captions.items()}
    n_fit = n * 3 // 4
    print(f"model {args.model or 'default'}; {n} position renders (seed 4242); one thread")
    print("| t | where x / y (8x8) | where x / y (4x4) | own / other, true (8x8) | own / other, flipped (8x8) "
          "| own / other, true (4x4) | own / other, flipped (4x4) |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for t in (int(s) for s in args.timesteps.split(",")):
        noisy = sched.add_noise(z, torch.randn(z.shape, generator=g), torch.full((n,), t))
        cells, share, feats = {}, {}, []
        for kind, states in ctx.items():
            assign, boxes, px = grounding_targets(tok, captions[kind], records, states.shape[1])
            swapped = boxes.clone()
            swapped[:, [0, 1]] = boxes[:, [1, 0]]
            # where: the queries' inputs, read during the true caption's forward
            hooks = [m.register_forward_pre_hook(lambda mod, a, kw: feats.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)
                     for name, m in unet.named_modules() if name.endswith("attn2") and kind == "true"]
            with torch.no_grad(), recording_attention(unet) as rec:
                unet(noisy, torch.full((n,), t), encoder_hidden_states=states)
            for h in hooks:
                h.remove()
            for res in (8, 4):
                layers = [q for q in rec.probs if q.shape[2] == res * res]
                a = torch.stack(layers).mean(0).mean(1)  # (N, HW, T)
                own_other = []
                for b in (boxes, swapped):
                    m = token_masks(assign, b, px, res).flatten(2).transpose(1, 2)
                    own_other.append(float(((a * m).sum(1) / a.sum(1))[assign > 0].mean()))
                share[(kind, res)] = "{:.2f} / {:.2f}".format(*own_other)
        for f in feats:
            hw = f.shape[1]
            side = int(round(hw ** 0.5))
            col = np.tile(np.arange(hw) % side, n).astype(float)
            row = np.tile(np.arange(hw) // side, n).astype(float)
            flat = f.reshape(n * hw, -1).numpy()
            cells.setdefault(side, []).append((ridge_r2(flat, col, n_fit * hw), ridge_r2(flat, row, n_fit * hw)))
        where = {s: "{:.2f} / {:.2f}".format(*np.mean(v, 0)) for s, v in cells.items()}
        print(f"| {t} | {where.get(8, '')} | {where.get(4, '')} | {share[('true', 8)]} | {share[('flipped', 8)]} "
              f"| {share[('true', 4)]} | {share[('flipped', 4)]} |", flush=True)


if __name__ == "__main__":
    main()
