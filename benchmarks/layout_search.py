"""When can layout search (sfumato.layout) tell which starting noise will honour a relation?

For N position prompts of the compositional evaluation, K candidate seeds each (candidate 0 is the
image's own seed) are sampled to the end at the model's default settings; after every step the
cross-attention of the two objects' words gives each candidate a relation margin, and the checker
judges every final image. Printed: the pass rate of the image's own seed, of a random candidate,
of the best candidate (an oracle), and of the candidate layout search would keep if it chose after
step s, for s = 1 .. steps and for the first k of the K candidates.

    python benchmarks/layout_search.py --n 50 --seed 0 --threads 1 [--grid docs/layout-search.png]

--grid draws the first 8 prompts twice: as their own seed draws them, and as layout search with
--k candidates draws them (the candidate chosen after half the steps), checker verdicts framed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def word_features(m: torch.Tensor, rel) -> dict:
    """Where and how sharply each of the two words attends in one candidate's (T, H, W) maps, and how
    much their maps overlap (for trying other scores offline from --out)."""
    from sfumato.layout import centroid

    a, b = (m[[p for p in toks if p < m.shape[0]]].sum(0) for toks in (rel.first_tokens, rel.second_tokens))
    na, nb = (x / x.sum().clamp_min(1e-12) for x in (a, b))
    return {"a": centroid(a), "b": centroid(b), "peak_a": float(na.max()), "peak_b": float(nb.max()),
            "overlap": float(torch.minimum(na, nb).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=50, help="position prompts")
    p.add_argument("--k", type=int, default=8, help="candidate seeds per prompt")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (prompts and images, as sfumato eval)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write every candidate's margins and verdicts here (JSON)")
    p.add_argument("--grid", type=Path, default=None, help="a PNG of the first 8 prompts without and with the search")
    args = p.parse_args()

    from PIL import Image

    from sfumato.attention import capture_cross_attention
    from sfumato.evaluate import evaluation_prompts
    from sfumato.layout import candidate_seeds, find_relation, look_ahead, margins
    from sfumato.pipeline import load, make_scheduler
    from sfumato.sampling import decode_latents, denoise, noise_of_seeds
    from sfumato.shapesworld.checker import judge

    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    s = pipe.settings("")
    unet = pipe.unet_for(s.scheduler)
    doubled = s.guidance != 1.0 and unet.config.time_cond_proj_dim is None
    size = pipe.native
    shape = (unet.config.in_channels, size // pipe.factor, size // pipe.factor)
    prompts = [(k, t) for k, (c, t) in enumerate(evaluation_prompts(args.n, args.seed)) if c == "position"][:args.n]
    rows, t0 = [], time.perf_counter()
    shown: list[tuple] = []  # (image, label, passed): own seed, then the search's choice
    for k, prompt in prompts:
        rel = find_relation(pipe.tokenizer, prompt)
        states, _ = pipe.encode([prompt, ""])
        seeds = candidate_seeds(args.seed + k, args.k)
        noise, gens = noise_of_seeds(shape, seeds)
        per_step: list[list[float]] = []
        words: list[list[dict]] = []
        with capture_cross_attention(unet, size, size, cfg=doubled, finest=True) as store:

            def read_step(state):  # each step's maps alone
                maps = store.maps()
                per_step.append(margins(maps, rel))
                words.append([word_features(m, rel) for m in maps])
                store.reset()

            latents = denoise(unet, make_scheduler(s.scheduler, pipe.scheduler_config),
                              states[:1].expand(len(seeds), -1, -1), states[1:].expand(len(seeds), -1, -1), noise,
                              s.steps, s.guidance, read_step, gens)
        pixels = decode_latents(pipe.vae, latents).numpy()
        passed = [bool(judge(Image.fromarray(a), prompt).passed) for a in pixels]
        if len(shown) < 16:
            pick = max(range(len(seeds)), key=per_step[look_ahead(s.steps) - 1].__getitem__)
            shown += [(Image.fromarray(pixels[0]), f"{prompt} (own seed)", passed[0]),
                      (Image.fromarray(pixels[pick]), f"{prompt} (search {args.k})", passed[pick])]
        rows.append({"k": k, "prompt": prompt, "relation": rel.relation, "pass": passed, "margins": per_step,
                     "words": words})
        print(f"{k} {prompt!r}: own seed {'pass' if passed[0] else 'fail'}, {sum(passed)}/{len(seeds)} candidates pass",
              flush=True)
    n = len(rows)

    def picked(step: int, first: int) -> float:
        return sum(r["pass"][max(range(first), key=r["margins"][step].__getitem__)] for r in rows) / n

    print(f"\n{s.scheduler}, {s.steps} steps, guidance {s.guidance:g}; {n} position prompts, evaluation seed "
          f"{args.seed}; {args.threads} thread(s), {time.perf_counter() - t0:.0f} s")
    print(f"own seed {sum(r['pass'][0] for r in rows) / n:.2f}, a random candidate "
          f"{sum(sum(r['pass']) for r in rows) / (n * args.k):.2f}, the best of {args.k} (oracle) "
          f"{sum(any(r['pass']) for r in rows) / n:.2f}")
    ks = [k for k in (2, 4, 8, 16) if k < args.k] + [args.k]
    print("| chosen after step | " + " | ".join(f"of {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for step in range(s.steps):
        print(f"| {step + 1} | " + " | ".join(f"{picked(step, k):.2f}" for k in ks) + " |")
    if args.out:
        args.out.write_text(json.dumps(rows))
    if args.grid:
        from sfumato.viz import make_grid

        order = shown[0::2] + shown[1::2]  # own seeds on top, the search's choices below
        make_grid([i for i, _, _ in order], [t for _, t, _ in order], cols=len(order) // 2,
                  marks=[m for _, _, m in order]).save(args.grid)


if __name__ == "__main__":
    main()
