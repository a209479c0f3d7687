"""Is the scene checker's digit reader calibrated? Renders, the VAE's reconstructions of them and
generated images, judged under their own prompt and under another digit's.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/checker_calibration.py [--model MODEL] [--n 200] \
        [--settings 0.26:1,0.35:3] [EVAL_DIR ...]

Each setting is digit fit limit : merge gap (checker.MAX_FIT_ERROR["digit"], checker.MERGE_GAP).
A calibrated reader reads the VAE's reconstructions of digit renders about as often as those of
the other categories (the VAE is not what is measured), and never passes an image under a prompt
naming another digit. EVAL_DIR: folders of `sfumato eval compositional --out`, whose digit images
are re-judged under each setting (what the setting does to a model's text score).
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sfumato
from sfumato.data import to_model_range
from sfumato.sampling import decode_latents
from sfumato.shapesworld import checker
from sfumato.shapesworld.checker import judge
from sfumato.shapesworld.render import make_scene, render
from sfumato.shapesworld.spec import CATEGORIES


def other_digit(caption: str) -> str:
    k = int(re.search(r"digit (\d)", caption).group(1))
    return re.sub(r"digit \d", f"digit {(k + 3) % 10}", caption)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="*")
    ap.add_argument("--model", default=None, help="whose VAE reconstructs (default: the shipped model)")
    ap.add_argument("--n", type=int, default=200, help="digit renders; 40 of each other category")
    ap.add_argument("--settings", default="0.26:1,0.35:3")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = sfumato.load(a.model)
    sf = pipe.vae.config.scaling_factor
    items = []  # (category, caption, render, reconstruction)
    for cat in CATEGORIES:
        for i in range(a.n if cat == "text" else 40):
            sc = make_scene(777, i, (cat,))
            img = np.asarray(render(sc, 64).convert("RGB"))
            x = to_model_range(torch.from_numpy(img.copy()).permute(2, 0, 1)[None]).to(pipe.device)
            rec = decode_latents(pipe.vae, pipe.vae.encode(x).latent_dist.mode() * sf)[0].numpy()
            items.append((cat, sc.caption, img, rec))
    generated = []
    for folder in a.evals:
        for line in (Path(folder) / "verdicts.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["category"] == "text":
                generated.append((r["prompt"], np.asarray(Image.open(Path(folder) / r["file"]).convert("RGB"))))
    print(f"VAE of {pipe.folder}; {a.n} digit renders and 40 of each other category (seed 777); "
          f"{len(generated)} generated digit images")
    print("| digit limit | merge gap | renders: digits / others | reconstructions: digits / others | "
          "reconstructions passed under another digit | generated: passed / under another digit |")
    print("|---|---|---|---|---|---|")
    for setting in a.settings.split(","):
        limit, gap = (float(v) for v in setting.split(":"))
        checker.MAX_FIT_ERROR["digit"], checker.MERGE_GAP = limit, gap

        def rate(pairs):
            return np.mean([judge(im, cap).passed for cap, im in pairs]) if pairs else float("nan")

        digits = [it for it in items if it[0] == "text"]
        others = [it for it in items if it[0] != "text"]
        cells = [f"{rate([(c, r) for _, c, r, _ in digits]):.2f} / {rate([(c, r) for _, c, r, _ in others]):.2f}",
                 f"{rate([(c, v) for _, c, _, v in digits]):.2f} / {rate([(c, v) for _, c, _, v in others]):.2f}",
                 f"{rate([(other_digit(c), v) for _, c, _, v in digits]):.3f}",
                 f"{rate(generated):.2f} / {rate([(other_digit(c), im) for c, im in generated]):.3f}"]
        print(f"| {limit:g} | {gap:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
