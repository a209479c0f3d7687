"""Why position prompts fail: the objects, the axis of the relation, or its side.

    python benchmarks/position_failures.py EVAL_DIR [EVAL_DIR ...]
    python benchmarks/position_failures.py --model MODEL [--n 24]    # does the relation move anything?
    python benchmarks/position_failures.py --model MODEL --x0        # from pure noise, does the x0 follow it?
    python benchmarks/position_failures.py --model MODEL --text      # do the text states carry it?

Reads the `verdicts.jsonl` that `sfumato eval compositional --out EVAL_DIR` writes and sorts each
position prompt into: passed; objects wrong (missing, extra or mis-drawn, so no relation was judged);
the relation on the wrong axis (side by side for "above", stacked for "left of"); the right axis but
the wrong side. Placed as ShapesWorld places two unrelated objects, a pair satisfies a named
relation 35 % of the time and has its axis right 50 % (4,000 two-object scenes, each judged against
the four relations); a UNet that reads the relation words but not their order would get the axis
right every time and the side half the time.

With --model: n random position prompts, each drawn at default settings with one seed under all four
relations; the median distance (px at 64) each named object moves between them. A UNet whose
layout follows the relation moves one or both across the canvas; one whose layout follows the noise
does not.

With --x0: the x0 the UNet predicts from pure noise (t = T - 1, zero terminal SNR), averaged over 8
noises, for n prompts under each relation: where the first-named object's colour sits against the
second's. Trained to the data, that is the mean over the scenes the caption allows: the first object
25 px to the named side of the second (the renders' figure is printed beside it).

With --text: what the UNet's text states (its cross-attention's keys and values) carry of the
relation. For n prompts, "left of" is swapped for "right of" (the same number of tokens), and, as a
control, the first object's colour for another; the relative change of the states (|a - b| / |a|)
is printed at the relation word and, averaged, at the tokens after it (the second object's words
and the end token). A tower that carries the relation into the words after it changes those as the
colour swap does.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from sfumato.shapesworld.checker import parse_prompt

AXIS = {"left": "x", "right": "x", "above": "y", "below": "y"}
# the checker's relation message: "... is right of the ... (dx=+12.0, dy=-3.0)"
OFFSET = re.compile(r"\(dx=([+-][\d.]+), dy=([+-][\d.]+)\)$")


def classify(verdict: dict) -> str:
    if verdict["pass"]:
        return "passed"
    m = OFFSET.search(verdict["reason"])
    if not m:
        return "objects wrong"
    dx, dy = float(m.group(1)), float(m.group(2))
    axis = "x" if abs(dx) >= abs(dy) else "y"
    return "wrong side" if axis == AXIS[parse_prompt(verdict["prompt"]).relation] else "wrong axis"


def layout_shift(model: str | None, n: int, threads: int) -> None:
    import random

    import numpy as np
    import torch

    import sfumato
    from sfumato.shapesworld import spec
    from sfumato.shapesworld.checker import parse_image

    torch.set_num_threads(threads)
    pipe = sfumato.load(model)
    rng = random.Random(0)
    shifts, seeds = [[], []], []
    for i in range(n):
        (c1, c2), (s1, s2) = rng.sample(list(spec.COLORS), 2), rng.sample(list(spec.SHAPES), 2)

        def centres(rel: str, seed: int):
            # the UNet alone: layout search would choose another noise for each relation
            img = pipe.generate(pipe.settings(f"a {c1} {s1} {spec.RELATION_WORDS[rel][0]} a {c2} {s2}", seed=seed,
                                              layout_search=0))[0]
            found = {o.color: o.center for o in parse_image(img).objects}
            return (found[c1], found[c2]) if c1 in found and c2 in found else None

        where = [centres(rel, 100 + i) for rel in spec.RELATIONS]
        other_seed = centres(spec.RELATIONS[0], 1100 + i)
        if all(where):
            for k in (0, 1):
                shifts[k] += [float(np.hypot(where[0][k][0] - q[k][0], where[0][k][1] - q[k][1])) for q in where[1:]]
            if other_seed:
                seeds.append(float(np.hypot(where[0][0][0] - other_seed[0][0], where[0][0][1] - other_seed[0][1])))
    print(f"{pipe.folder}: {n} prompts x 4 relations, one seed each, {threads} thread(s): another relation moves the "
          f"first object a median {np.median(shifts[0]):.1f} px (mean {np.mean(shifts[0]):.1f}), the second "
          f"{np.median(shifts[1]):.1f} px (mean {np.mean(shifts[1]):.1f}; {len(shifts[0])} pairs); another seed moves "
          f"the first {np.median(seeds):.1f} px (mean {np.mean(seeds):.1f}, {len(seeds)})")


def x0_from_noise(model: str | None, n: int, threads: int) -> None:
    import random

    import numpy as np
    import torch

    import sfumato
    from sfumato.diffusion import predicted_x0
    from sfumato.explain import _train_scheduler
    from sfumato.sampling import decode_latents
    from sfumato.shapesworld import spec
    from sfumato.shapesworld.render import make_scene

    def centroid(img: np.ndarray, color: str) -> np.ndarray:
        w = np.clip(1 - np.linalg.norm(img.astype(np.float32) - np.array(spec.COLORS[color], np.float32), axis=-1)
                    / 120, 0, 1) ** 2
        ys, xs = np.indices(w.shape)
        return np.array([(w * xs).sum(), (w * ys).sum()]) / (w.sum() + 1e-6)

    torch.set_num_threads(threads)
    pipe = sfumato.load(model)
    sched = _train_scheduler(pipe)
    ac, last = sched.alphas_cumprod, len(sched.alphas_cumprod) - 1
    rng = random.Random(0)
    got = {r: [] for r in spec.RELATIONS}
    with torch.no_grad():
        for i in range(n):
            (c1, c2), (s1, s2) = rng.sample(list(spec.COLORS), 2), rng.sample(list(spec.SHAPES), 2)
            c = pipe.unet.config
            noise = torch.randn(8, c.in_channels, c.sample_size, c.sample_size,
                                generator=torch.Generator().manual_seed(i)).to(pipe.device)
            t = torch.full((8,), last, device=pipe.device)
            for rel in spec.RELATIONS:
                text, _ = pipe.encode([f"a {c1} {s1} {spec.RELATION_WORDS[rel][0]} a {c2} {s2}"] * 8)
                out = pipe.unet(noise, t, encoder_hidden_states=text).sample
                x0 = predicted_x0(sched.config.prediction_type, noise, out, ac[last].to(noise))
                img = decode_latents(pipe.vae, x0.mean(0, keepdim=True))[0].numpy()
                got[rel].append(centroid(img, c1) - centroid(img, c2))
    renders = {r: [] for r in spec.RELATIONS}
    for i in range(2000):
        sc = make_scene(4242, i, ("position",))
        rel = next(r for r in spec.RELATIONS if any(w in sc.caption for w in spec.RELATION_WORDS[r]))
        renders[rel].append(np.array(sc.objects[0].center) - np.array(sc.objects[1].center))
    print(f"{pipe.folder}: x0 from pure noise, {n} prompts x 8 noises, {threads} thread(s); "
          "first object minus second (px)")
    for rel in spec.RELATIONS:
        (mx, my), (rx, ry) = np.mean(got[rel], 0), np.mean(renders[rel], 0)
        print(f"  {rel:6s} UNet dx {mx:+6.1f} dy {my:+6.1f}   renders dx {rx:+6.1f} dy {ry:+6.1f}")


def text_states(model: str | None, n: int, threads: int) -> None:
    import random

    import numpy as np
    import torch

    import sfumato
    from sfumato.sampling import prompt_ids
    from sfumato.shapesworld import spec

    torch.set_num_threads(threads)
    pipe = sfumato.load(model)
    rng = random.Random(0)
    at, after, colour_after = [], [], []
    with torch.no_grad():
        for _ in range(n):
            (c1, c2, c3), (s1, s2) = rng.sample(list(spec.COLORS), 3), rng.sample(list(spec.SHAPES), 2)
            prompts = [f"a {c1} {s1} to the left of a {c2} {s2}", f"a {c1} {s1} to the right of a {c2} {s2}",
                       f"a {c3} {s1} to the left of a {c2} {s2}"]
            ids = prompt_ids(pipe.tokenizer, prompts)
            states, _ = pipe.encode(prompts)
            states = states.float().cpu()
            r = int((ids[0] != ids[1]).nonzero()[0, 0])  # the relation word
            end = int((ids[0] == pipe.tokenizer.eos_token_id).nonzero()[0, 0]) + 1
            rel = (states[0] - states[1]).norm(dim=-1) / states[0].norm(dim=-1)
            col = (states[0] - states[2]).norm(dim=-1) / states[0].norm(dim=-1)
            at.append(float(rel[r]))
            after.append(float(rel[r + 1:end].mean()))
            colour_after.append(float(col[r + 1:end].mean()))
    print(f"{pipe.folder}: text states, {n} prompts, {threads} thread(s); relative change when 'left' becomes "
          f"'right': {np.mean(at):.2f} at the word, {np.mean(after):.3f} at the words after it; when the first "
          f"colour changes: {np.mean(colour_after):.3f} at the words after the relation")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="*", help="folders written by `sfumato eval compositional --out`")
    ap.add_argument("--model", default=None, help="measure how far the relation moves the objects instead")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--x0", action="store_true", help="with --model: the x0 predicted from pure noise instead")
    ap.add_argument("--text", action="store_true", help="with --model: what the text states carry of the relation")
    a = ap.parse_args()
    if a.text:
        return text_states(a.model, a.n, a.threads)
    if a.x0:
        return x0_from_noise(a.model, a.n, a.threads)
    if a.model or not a.evals:
        return layout_shift(a.model, a.n, a.threads)
    kinds = ("passed", "objects wrong", "wrong axis", "wrong side")
    print("| eval | n | " + " | ".join(kinds) + " | axis right, of judged pairs |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for folder in a.evals:
        rows = [json.loads(line) for line in (Path(folder) / "verdicts.jsonl").read_text().splitlines() if line]
        c = Counter(classify(r) for r in rows if r["category"] == "position")
        n = sum(c.values())
        judged = c["passed"] + c["wrong axis"] + c["wrong side"]
        axis_right = (c["passed"] + c["wrong side"]) / judged if judged else float("nan")
        print(f"| {folder} | {n} | " + " | ".join(str(c[k]) for k in kinds) + f" | {axis_right:.2f} |")


if __name__ == "__main__":
    main()
