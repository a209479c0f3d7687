"""Which object does each region of the image read? Cross-attention to the first- and second-named
object of two-object captions, over the whole image and inside each object's box.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attention_share.py [--model M ...] [--scenes 100]

Held-out two-object ShapesWorld renders (seed 4242; training uses seed 0) of two objects with
distinct colours and shapes, captioned "a C1 S1 and a C2 S2", are noised to t (one noise per scene)
and run through the UNet once with that caption. The share of object k is the attention to its
two words (colour, shape) as a fraction of the attention to all tokens, summed over heads and every
cross-attention layer, averaged over the region's pixels. A UNet that routes each region to its own
object reads the second object more than the first inside the second object's box.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sfumato.attention import capture_cross_attention, word_token_spans
from sfumato.data import to_model_range
from sfumato.explain import _train_scheduler
from sfumato.pipeline import load
from sfumato.shapesworld.render import Scene, make_scene, render

TIMESTEPS = (300, 700, 950)


def scenes(n: int, seed: int = 4242):
    """Two-object scenes with distinct colours and shapes, re-captioned in one fixed template."""
    out, i = [], 0
    while len(out) < n:
        s = make_scene(seed, i, ("two_objects",))
        i += 1
        a, b = s.objects
        if a.color == b.color or a.shape == b.shape:
            continue
        caption = f"a {a.color} {a.shape} and a {b.color} {b.shape}"
        out.append(Scene(s.background, s.objects, s.category, caption))
    return out


@torch.no_grad()
def shares(folder: str | None, n: int) -> dict[str, float]:
    pipe = load(folder, onnx=False)
    sched = _train_scheduler(pipe)
    side = pipe.native
    sums: dict[str, list[float]] = {}
    for k, s in enumerate(scenes(n)):
        img = render(s, side)
        x = to_model_range(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])
        z0 = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(k))
        ts = torch.tensor(TIMESTEPS)
        noisy = torch.cat([sched.add_noise(z0, noise, t[None]) for t in ts])
        text, _ = pipe.encode([s.caption])
        with capture_cross_attention(pipe.unet, side, side) as store:
            pipe.unet(noisy, ts, encoder_hidden_states=text.expand(len(ts), -1, -1))
        maps = store.maps()  # (timesteps, tokens, H, W)
        share = maps / maps.sum(1, keepdim=True)
        spans = word_token_spans(pipe.tokenizer, s.caption)  # a C1 S1 and a C2 S2
        first = [p for _, sp in spans[1:3] for p in sp]
        second = [p for _, sp in spans[5:7] for p in sp]
        scale = side / 64  # boxes are in 64-px units
        regions = {"image": (slice(None), slice(None))}
        for name, o in (("box1", s.objects[0]), ("box2", s.objects[1])):
            x0, y0, x1, y1 = (round(v * scale) for v in o.bbox)
            regions[name] = (slice(y0, y1), slice(x0, x1))
        for j, t in enumerate(TIMESTEPS):
            for region, (ys, xs) in regions.items():
                for obj, pos in (("first", first), ("second", second)):
                    v = float(share[j, pos][:, ys, xs].sum(0).mean())
                    sums.setdefault(f"t{t} {region} {obj}", []).append(v)
    return {k: float(np.mean(v)) for k, v in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model folder(s); the shipped default without one")
    p.add_argument("--scenes", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    models = args.model or [None]
    results = {m or "default": shares(m, args.scenes) for m in models}
    print("| model | t | image: first / second | first's box: first / second | second's box: first / second |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        for t in TIMESTEPS:
            cells = [f"{r[f't{t} {reg} first']:.2f} / {r[f't{t} {reg} second']:.2f}" for reg in ("image", "box1", "box2")]
            print(f"| {m} | {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
