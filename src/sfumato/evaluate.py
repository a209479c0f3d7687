"""Compositional evaluation (GenEval-style) of a generator with the ShapesWorld scene checker, and the
pure metric functions (pointing game, mask IoU, PSNR, recall@k).

    sfumato eval compositional --per-category 50 --out eval/

Samples prompts per category from the caption grammar, generates one image per prompt, judges it,
and writes results.json (overall = mean of the category pass rates), verdicts.jsonl and a marked
grid per category.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from .progress import start_progress
from .shapesworld import spec


def sample_prompt(rng: random.Random, category: str) -> str:
    """One evaluation prompt of the given category, in the fixed forms of SHAPESWORLD.md."""
    shapes, colors = spec.SHAPES, tuple(spec.COLORS)
    if category == "single_object":
        return f"a {rng.choice(shapes)}"
    if category == "colors":
        return f"a {rng.choice(colors)} {rng.choice(shapes)}"
    if category == "size":
        size = rng.choice(("small", "large"))
        return f"a {rng.choice(spec.SIZE_WORDS[size])} {rng.choice(shapes)}"
    if category == "background":
        return f"a {rng.choice(colors)} {rng.choice(shapes)} on a {rng.choice(tuple(spec.BACKGROUNDS))} background"
    if category == "two_objects":
        a, b = rng.sample(shapes, 2)
        return f"a {a} and a {b}"
    if category == "counting":
        n = rng.choice(tuple(spec.NUMBERS))
        return f"{n} {rng.choice(colors)} {spec.PLURALS[rng.choice(shapes)]}"
    if category == "position":
        (a, b), (ca, cb) = rng.sample(shapes, 2), (rng.choice(colors), rng.choice(colors))
        rel = rng.choice(spec.RELATION_WORDS[rng.choice(spec.RELATIONS)])
        return f"a {ca} {a} {rel} a {cb} {b}"
    if category == "attribute_binding":
        (a, b), (ca, cb) = rng.sample(shapes, 2), rng.sample(colors, 2)
        return f"a {ca} {a} and a {cb} {b}"
    if category == "text":
        d, c = rng.randrange(10), rng.choice(colors)
        return rng.choice((f"the digit {d} in {c}", f"a {c} digit {d}"))
    raise ValueError(f"unknown category {category!r}")


def evaluation_prompts(per_category: int, seed: int = 0,
                       categories: tuple[str, ...] = spec.CATEGORIES) -> list[tuple[str, str]]:
    rng = random.Random(f"sfumato-eval/{seed}")
    return [(c, sample_prompt(rng, c)) for c in categories for _ in range(per_category)]


def summarize(verdicts: list[dict]) -> dict:
    """Per-category pass rates and their unweighted mean."""
    cats: dict[str, list[bool]] = {}
    for v in verdicts:
        cats.setdefault(v["category"], []).append(bool(v["pass"]))
    per = {c: sum(v) / len(v) for c, v in cats.items()}
    return {"overall": sum(per.values()) / len(per) if per else 0.0, "per_category": per,
            "counts": {c: len(v) for c, v in cats.items()}}


def evaluate_compositional(pipe, out: Path, per_category: int = 50, seed: int = 0,
                           steps: int | None = None, guidance: float | None = None, scheduler: str | None = None,
                           categories: tuple[str, ...] = spec.CATEGORIES, progress: bool = True,
                           layout_search: int | None = None, mean_prior: float | None = None) -> dict:
    """Generate, judge and report; returns the results dict also written to out/results.json.
    Steps, guidance, sampler, layout search and mean prior default to the model's own (Pipeline.settings)."""
    from PIL import Image

    from .images import save_png
    from .shapesworld.checker import judge
    from .viz import make_grid

    s = pipe.settings("", steps=steps, guidance=guidance, scheduler=scheduler, layout_search=layout_search,
                      mean_prior=mean_prior)
    steps, guidance, scheduler, layout_search, mean_prior = s.steps, s.guidance, s.scheduler, s.layout_search, s.mean_prior
    prompts = evaluation_prompts(per_category, seed, categories)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    verdicts: list[dict] = []
    images: dict[str, list[tuple[Image.Image, str, bool]]] = {}
    t0 = time.perf_counter()
    bar, task = start_progress(len(prompts), "generating and judging") if progress else (None, None)
    try:
        for k, (category, prompt) in enumerate(prompts):
            img = pipe.generate(pipe.settings(prompt, seed=seed + k, steps=steps, guidance=guidance,
                                              scheduler=scheduler, layout_search=layout_search,
                                              mean_prior=mean_prior))[0]
            v = judge(img, prompt)
            name = f"{category}-{k:05d}.png"
            save_png(img, out / "images" / name)
            verdicts.append({"category": category, "prompt": prompt, "file": f"images/{name}", "seed": seed + k,
                             "pass": bool(v.passed), "reason": v.reason})
            images.setdefault(category, []).append((img, prompt, bool(v.passed)))
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    seconds = time.perf_counter() - t0
    for category, items in images.items():
        make_grid([i for i, _, _ in items], [p for _, p, _ in items], cols=10, cell=96,
                  marks=[m for _, _, m in items]).save(out / f"grid-{category}.png")
    results = {**summarize(verdicts), "model": str(pipe.folder), "model_hash": pipe.hash, "per_category_n": per_category,
               "seed": seed, "steps": steps, "guidance": guidance, "scheduler": scheduler, "layout_search": layout_search,
               "mean_prior": mean_prior,
               "seconds_per_image": seconds / max(1, len(prompts))}
    _write_json(out / "results.json", results)
    (out / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts), encoding="utf-8")
    return results


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- metrics (pure functions)


def pointing_hit(m: np.ndarray, box: tuple[float, float, float, float], scale: float = 1.0) -> bool:
    """Pointing game: does the map's peak lie inside the box ([x0, y0, x1, y1) in 64-px units, times `scale`)?"""
    y, x = np.unravel_index(m.argmax(), m.shape)
    x0, y0, x1, y1 = (v * scale for v in box)
    return x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1


def mask_iou(m: np.ndarray, box, scale: float = 1.0, threshold: float = 0.5) -> float:
    """IoU of the map thresholded at `threshold` with the object's box."""
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    b = np.zeros(m.shape, bool)
    b[y0:y1, x0:x1] = True
    a = m >= threshold
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def psnr(a_u8, b_u8) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 image tensors (MSE floored at 1e-10)."""
    mse = (a_u8.float() - b_u8.float()).pow(2).mean().item()
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k (ids; -1 pads never match)."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if len(hits) else 0.0


# Which caption edit probes which skill, and the scenes it is measured on.
COUNTERFACTUAL_EDITS = {
    "relation": ("swap_relation", "position"),
    "binding": ("swap_colors", "attribute_binding"),
    "shape": ("shape", "two_objects"),
    "count": ("count", "counting"),
    "digit": ("digit", "text"),
    "color": ("color", "colors"),
}


def counterfactual_sensitivity(unet, scheduler, vae, tokenizer, text_encoder, n: int = 120,
                               timesteps: tuple[int, ...] = (700, 950), seed: int = 4242) -> dict[str, float]:
    """How much the prompt steers the UNet, without sampling: for n held-out renders per edit kind,
    noise the image's latent to t and compare the x0 error under the true caption with the error under
    a minimally edited one (relation flipped, colours swapped, a shape, count, digit or colour changed).
    Returns {"cf_{edit}_t{t}": relative increase of the error}; 0 means the UNet ignores that part of the
    prompt. It moves long before sampled pass rates do."""
    import torch

    from .clip import edit_caption
    from .data import to_model_range, to_uint8_tensor
    from .diffusion import predicted_x0
    from .models import vae_factor
    from .sampling import encode_prompts
    from .shapesworld import ShapesWorld

    rng = random.Random(seed)
    ac = scheduler.alphas_cumprod
    out = {}
    for name, (kind, category) in COUNTERFACTUAL_EDITS.items():
        world = ShapesWorld(4 * n, seed=seed, res=unet.config.sample_size * vae_factor(vae),
                            categories=(category,))
        images, true, edited = [], [], []
        for img, cap, _ in world:
            e = edit_caption(cap, kind, rng)
            if e and e != cap:
                images.append(img), true.append(cap), edited.append(e)
            if len(images) == n:
                break
        with torch.no_grad():
            z = vae.encode(to_model_range(to_uint8_tensor(images)).to(unet.device)).latent_dist.mean
            z = z * vae.config.scaling_factor
            ctx_true = encode_prompts(tokenizer, text_encoder, true)
            ctx_edit = encode_prompts(tokenizer, text_encoder, edited)
            for t in timesteps:
                g = torch.Generator().manual_seed(seed + t)
                noise = torch.randn(z.shape, generator=g).to(z.device)
                tt = torch.full((len(z),), t, device=z.device)
                noisy = scheduler.add_noise(z, noise, tt)
                a = ac[t].to(z.device)
                errs = []
                for ctx in (ctx_true, ctx_edit):
                    pred = unet(noisy, tt, encoder_hidden_states=ctx).sample.float()
                    x0 = predicted_x0(scheduler.config.prediction_type, noisy, pred, a)
                    errs.append(float(((x0 - z) ** 2).mean()))
                out[f"cf_{name}_t{t}"] = errs[1] / max(errs[0], 1e-12) - 1
    return out
