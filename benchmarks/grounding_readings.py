"""Which reading of the UNet's cross-attention points at a phrase best? (the choice behind explain.ground)

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/grounding_readings.py [--model MODEL] [--scenes 200]

Held-out two-object ShapesWorld renders (seed 555; training uses seed 0, bench_explain.py 777); for
each object the phrase "{colour} {shape}", read at the finest cross-attention layers and
`GROUNDING_TIMESTEPS` as `ground()` does; a hit when the map's peak lies inside the object's box.
Readings: each content word alone, the words' maps summed (each word weighs by the attention it
draws), each word's map scaled to [0, 1] and then summed, and their product.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import sfumato
from sfumato.attention import capture_cross_attention, normalise
from sfumato.data import to_model_range
from sfumato.evaluate import pointing_hit
from sfumato.explain import GROUNDING_TIMESTEPS, _as_caption, _train_scheduler, token_maps_to_words
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
    sched = _train_scheduler(pipe)
    ts = torch.tensor(GROUNDING_TIMESTEPS)
    hits = {k: [] for k in READINGS}
    t0, i, scenes = time.perf_counter(), 0, 0
    while scenes < a.scenes:
        sc = make_scene(555, i, TWO_OBJECT)
        i += 1
        if len(sc.objects) != 2 or any(o.shape == "digit" for o in sc.objects):
            continue
        scenes += 1
        x = to_model_range(torch.from_numpy(np.array(render(sc, 64).convert("RGB"))).permute(2, 0, 1)[None])
        z0 = pipe.vae.encode(x.to(pipe.device)).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)).to(pipe.device)
        noisy = torch.cat([sched.add_noise(z0, noise, t[None]) for t in ts])
        for o in sc.objects:
            caption = _as_caption(f"{o.color} {o.shape}")
            text, _ = pipe.encode([caption])
            with capture_cross_attention(pipe.unet, 64, 64, finest=True) as store:
                pipe.unet(noisy, ts.to(pipe.device), encoder_hidden_states=text.expand(len(ts), -1, -1))
            words = [m for _, m in token_maps_to_words(pipe.tokenizer, caption, store.maps().sum(0), content_only=True)]
            for name, read in READINGS.items():
                m = F.interpolate(read(words)[None, None].float().cpu(), size=(64, 64), mode="bilinear",
                                  align_corners=False)[0, 0]
                hits[name].append(pointing_hit(m.numpy(), o.bbox))
    print(f"{pipe.folder}: {scenes} scenes, {2 * scenes} phrases, {a.threads} thread(s), "
          f"{time.perf_counter() - t0:.0f} s")
    for name, h in hits.items():
        print(f"  {name:32s} pointing {np.mean(h):.3f}")


if __name__ == "__main__":
    main()
