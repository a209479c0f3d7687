"""Which reading of the UNet's cross-attention points at a phrase best? (the choice behind explain.ground)

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/grounding_readings.py [--model MODEL] [--scenes 200]

Held-out two-object ShapesWorld renders (seed 555; training uses seed 0, bench_explain.py 777); for
each object the phrase "{colour} {shape}", its words' maps read by `explain.phrase_word_maps` as
`ground()` reads them; a hit when the map's peak lies inside the object's box.
Readings: each content word alone, the words' maps summed (each word weighs by the attention it
draws), each word's map scaled to [0, 1] and then summed, and their product.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import sfumato
from sfumato.attention import normalise
from sfumato.evaluate import pointing_hit
from sfumato.explain import phrase_word_maps
from sfumato.shapesworld.render import make_scene, render

TWO_OBJECT = ("two_objects", "position", "attribute_binding")

READINGS = {
    "colour word": lambda ms: ms[0],
    "shape word": lambda ms: ms[-1],
    "words summed": lambda ms: torch.stack(ms).sum(0),
    "words scaled alike, summed": lambda ms: normalise(torch.stack(ms)).sum(0),
    "words scaled alike, multiplied": lambda ms: normalise(torch.stack(ms)).prod(0),
}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = sfumato.load(a.model)
    hits = {k: [] for k in READINGS}
    t0, i, scenes = time.perf_counter(), 0, 0
    while scenes < a.scenes:
        sc = make_scene(555, i, TWO_OBJECT)
        i += 1
        if len(sc.objects) != 2 or any(o.shape == "digit" for o in sc.objects):
            continue
        scenes += 1
        phrases = [f"{o.color} {o.shape}" for o in sc.objects]
        for o, words in zip(sc.objects, phrase_word_maps(pipe, render(sc, 64).convert("RGB"), phrases)):
            maps = [m for _, m in words]
            for name, read in READINGS.items():
                m = F.interpolate(read(maps)[None, None].float().cpu(), size=(64, 64), mode="bilinear",
                                  align_corners=False)[0, 0]
                hits[name].append(pointing_hit(m.numpy(), o.bbox))
    print(f"{pipe.folder}: {scenes} scenes, {2 * scenes} phrases, {a.threads} thread(s), "
          f"{time.perf_counter() - t0:.0f} s")
    for name, h in hits.items():
        print(f"  {name:32s} pointing {np.mean(h):.3f}")


if __name__ == "__main__":
    main()
