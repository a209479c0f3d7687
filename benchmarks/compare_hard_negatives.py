"""Does training CLIP with caption-edit hard negatives help binding and relation retrieval?

    python benchmarks/compare_hard_negatives.py [--preset small] [--steps 400] [--n 20000]

Trains the tokenizer and CLIP twice on the same ShapesWorld pairs, seed and steps, with and without
hard negatives, and prints the held-out metrics side by side.
"""

import argparse
import json
import tempfile
from pathlib import Path

from sfumato.config import apply_overrides, get_preset
from sfumato.train import train

KEYS = ("text_to_image_match_R@1", "text_to_image_match_R@5", "image_to_text_match_R@1",
        "hard_negative_swap_colors_acc", "hard_negative_swap_relation_acc", "hard_negative_count_acc",
        "hard_negative_digit_acc", "hard_negative_color_acc")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hn in (False, True):
            cfg = apply_overrides(get_preset(args.preset), [f"clip.steps={args.steps}", f"data.shapes_n={args.n}",
                                                            f"clip.hard_negatives={hn}", f"eval_every={args.steps}"])
            out = Path(tmp) / f"hn-{hn}"
            work = train("shapesworld", out, cfg, ("tokenizer", "clip"), progress=False)
            results[hn] = json.loads((work / "run.json").read_text())["metrics"]["clip"]
    print(f"{'metric':<34} {'without':>8} {'with':>8}")
    for k in KEYS:
        a, b = results[False].get(k), results[True].get(k)
        if a is not None and b is not None:
            print(f"{k:<34} {a:8.3f} {b:8.3f}")


if __name__ == "__main__":
    main()
