"""How well do the explanations point at the right things?

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_explain.py [--model MODEL] [--scenes 200] [--audit 60]

1. Pointing game for `explain image`: held-out two-object ShapesWorld renders (seed 777; training
   uses seed 0); for each object the phrase "{colour} {shape}"; a hit when the peak of the phrase's
   heat map lies inside that object's box. Also the IoU of the map thresholded at 0.5 with the box.
   Chance level is the box's share of the image, printed alongside.
2. Audit agreement on generated images: for evaluation prompts (position, colours, counting,
   attribute binding), the scene checker's verdict against the audit's model-only judges: the
   zero-shot word swaps (all words kept = pass) and, for position prompts, the attention-peak
   relation row.
"""

import argparse
import random
import time

import numpy as np

import sfumato
from sfumato.embedding import Embedder
from sfumato.evaluate import sample_prompt
from sfumato.evaluate import mask_iou, pointing_hit
from sfumato.explain import attention_rows, ground, zero_shot_rows
from sfumato.shapesworld.checker import judge
from sfumato.shapesworld.render import make_scene, render

TWO_OBJECT = ("two_objects", "position", "attribute_binding")


def phrase(o) -> str:
    return f"{o.color} {o.shape}" if o.shape != "digit" else f"{o.color} digit {o.digit}"


def pointing(pipe, n: int, seed: int = 777):
    hits, ious, chance, t0 = [], [], [], time.perf_counter()
    i = 0
    while len(hits) < 2 * n:
        sc = make_scene(seed, i, TWO_OBJECT)
        i += 1
        if len(sc.objects) != 2:
            continue
        img = render(sc, 64)
        g = ground(pipe, img, [phrase(o) for o in sc.objects])
        for m, o in zip(g.maps, sc.objects):
            hits.append(pointing_hit(m, o.bbox))
            ious.append(mask_iou(m, o.bbox))
            x0, y0, x1, y1 = o.bbox
            chance.append((x1 - x0) * (y1 - y0) / 64 ** 2)
    dt = (time.perf_counter() - t0) / (len(hits) / 2)
    print(f"pointing game: {np.mean(hits):.3f} over {len(hits)} phrases in {len(hits) // 2} scenes "
          f"(chance {np.mean(chance):.3f}); mask IoU@0.5 {np.mean(ious):.3f}; {dt:.2f} s per scene")


def audit_agreement(pipe, emb, n: int, seed: int = 0):
    rng = random.Random(f"bench-explain/{seed}")
    cats = ("position", "colors", "counting", "attribute_binding")
    zs_agree, rel_agree, passes = [], [], []
    for k in range(n):
        prompt = sample_prompt(rng, cats[k % len(cats)])
        img = pipe.generate(sfumato.GenerationSettings(prompt, seed=seed + k))[0]
        verdict = judge(img, prompt)
        passes.append(verdict.passed)
        zs = zero_shot_rows(emb, img, prompt)
        zs_agree.append(all(r.ok for r in zs) == verdict.passed)
        for r in attention_rows(pipe, img, prompt):
            # Only meaningful when the checker saw both objects and could judge the relation itself.
            if verdict.passed or "'" in verdict.reason:
                rel_agree.append(r.ok == verdict.passed)
    print(f"audit on {n} generated images (checker pass rate {np.mean(passes):.3f}): zero-shot verdict agrees "
          f"with the checker {np.mean(zs_agree):.3f}; attention relation agrees {np.mean(rel_agree) if rel_agree else float('nan'):.3f} "
          f"over {len(rel_agree)} judgeable position images")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--audit", type=int, default=60)
    a = ap.parse_args()
    pipe = sfumato.load(a.model)
    pointing(pipe, a.scenes)
    if a.audit:
        audit_agreement(pipe, Embedder.load(pipe.folder), a.audit)


if __name__ == "__main__":
    main()
