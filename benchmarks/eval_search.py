"""Measure search and zero-shot classification of a model on held-out ShapesWorld.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/eval_search.py --model MODEL [--sweep]

Held out: the gallery is rendered with --seed (default 777); `sfumato train --data shapesworld`
trains on seed 0, so these scenes were not trained on (a few simple scenes may recur by chance:
the scene space is small). Definitions (each metric is a flat `dict[str, float]` key):

* attribute queries "a {colour} {shape}" for all 24 pairs, text -> image over the gallery:
  - a hit *contains* an object of that colour and shape (any other objects allowed);
  - `attr_P@10`: precision at 10 of that; `attr_R@k`: share of queries with a hit in the top k
    (open_clip-style recall: one relevant item suffices);
  - `attr_exact_P@10`: a hit must be exactly one object, of that colour and shape.
* caption retrieval on the gallery's own pairs (`clip.retrieval_metrics`): `image_to_text_R@k`,
  `text_to_image_R@k` (pair i <-> i) and their `*_match_R@k` (same caption text counts).
* zero-shot accuracy with the default template ensemble (labels in caption words, the
  prediction is the argmax of probabilities summed over the other attributes):
  `zs_shape`, `zs_color` (single non-digit objects; labels "{colour} {shape}"), `zs_count`
  (counting scenes; labels "{number} {colour} {plural}"), `zs_digit` (digit scenes; labels
  "{colour} digit {k}"); `zs_*_direct` uses the bare attribute ("circle", "red") as the label.
* composite "this single object, but {colour}": each query image is a single non-digit object of
  colour c, the words name another colour c'; `composite_top3` is the share of the top 3 (the
  query image excluded) holding an object of the same shape in colour c', `composite_any3` the share
  of queries with at least one such hit; `composite_text_oracle_top3` does the same with the text
  "a {c'} {shape}" alone, `composite_image_only_top3` with the image alone (alpha 0).

--sweep ranks composite (method, alpha) on a tuning split (seed + 1) by top-3 averaged over the
phrasings "{c}" and "in {c}", then measures the best, the default and "sum" on the evaluation split.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sfumato.shapesworld import ShapesWorld, spec  # noqa: E402

COLORS, SHAPES = tuple(spec.COLORS), spec.SHAPES
ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
PHRASES = ("{}", "in {}")


def render(n: int, seed: int, res: int):
    ds = ShapesWorld(n, seed=seed, res=res)
    items = [ds[i] for i in range(n)]
    return [x[0] for x in items], [x[1] for x in items], [x[2] for x in items]


def has(rec: dict, color: str, shape: str) -> bool:
    return any(o["shape"] == shape and o["color"] == color for o in rec["objects"])


def single(rec: dict) -> dict | None:
    objs = rec["objects"]
    return objs[0] if len(objs) == 1 and objs[0]["shape"] != "digit" else None


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def attribute_queries(emb, img: np.ndarray, recs: list[dict]) -> dict[str, float]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    t = emb.embed_texts([f"a {c} {s}" for c, s in pairs])
    order = topk(t @ img.T, 10)  # (24, 10)
    p10, exact10, r = [], [], {1: [], 5: [], 10: []}
    for (c, s), top in zip(pairs, order):
        rel = np.array([has(rec, c, s) for rec in recs])
        if not rel.any():
            continue
        ex = np.array([(o := single(rec)) is not None and o["color"] == c and o["shape"] == s for rec in recs])
        p10.append(rel[top].mean())
        exact10.append(ex[top].mean())
        for k in r:
            r[k].append(rel[top[:k]].any())
    out = {"attr_P@10": float(np.mean(p10)), "attr_exact_P@10": float(np.mean(exact10)),
           "attr_queries": float(len(p10))}
    out.update({f"attr_R@{k}": float(np.mean(v)) for k, v in r.items()})
    return out


def zero_shot(emb, img: np.ndarray, recs: list[dict]) -> dict[str, float]:
    from sfumato.search import classify_embeddings

    out = {}
    one = [i for i, r in enumerate(recs) if single(r)]
    labels = [(c, s) for c in COLORS for s in SHAPES]
    p = classify_embeddings(emb, img[one], [f"{c} {s}" for c, s in labels])
    truth = [single(recs[i]) for i in one]
    for name, values, key in (("color", COLORS, 0), ("shape", SHAPES, 1)):
        marg = np.stack([p[:, [j for j, lab in enumerate(labels) if lab[key] == v]].sum(1) for v in values], 1)
        out[f"zs_{name}"] = float(np.mean([values[int(m)] == t[name] for m, t in zip(marg.argmax(1), truth)]))
        direct = classify_embeddings(emb, img[one], list(values))
        out[f"zs_{name}_direct"] = float(np.mean([values[int(m)] == t[name]
                                                  for m, t in zip(direct.argmax(1), truth)]))
    cnt = [i for i, r in enumerate(recs) if r["category"] == "counting"]
    labels = [(n, c, s) for n in spec.NUMBERS for c in COLORS for s in SHAPES]
    p = classify_embeddings(emb, img[cnt], [f"{n} {c} {spec.PLURALS[s]}" for n, c, s in labels])
    numbers = tuple(spec.NUMBERS)
    marg = np.stack([p[:, [j for j, lab in enumerate(labels) if lab[0] == n]].sum(1) for n in numbers], 1)
    out["zs_count"] = float(np.mean([spec.NUMBERS[numbers[int(m)]] == len(recs[i]["objects"])
                                     for m, i in zip(marg.argmax(1), cnt)]))
    dig = [i for i, r in enumerate(recs) if r["category"] == "text"]
    labels = [(c, d) for c in COLORS for d in range(10)]
    p = classify_embeddings(emb, img[dig], [f"{c} digit {d}" for c, d in labels])
    marg = np.stack([p[:, [j for j, lab in enumerate(labels) if lab[1] == d]].sum(1) for d in range(10)], 1)
    out["zs_digit"] = float(np.mean([int(m) == recs[i]["objects"][0]["digit"] for m, i in zip(marg.argmax(1), dig)]))
    out["zs_n"] = float(len(one))
    return out


def composite_queries(recs: list[dict], n: int, seed: int) -> list[tuple[int, str, str]]:
    """(image index, new colour, shape) for up to n single-object images."""
    rng = random.Random(seed)
    idx = [i for i, r in enumerate(recs) if single(r)]
    rng.shuffle(idx)
    return [(i, rng.choice([c for c in COLORS if c != single(recs[i])["color"]]), single(recs[i])["shape"])
            for i in idx[:n]]


def composite_score(img: np.ndarray, recs, queries, q: np.ndarray) -> tuple[float, float]:
    scores = q @ img.T  # (Q, N)
    for row, (i, _, _) in enumerate(queries):
        scores[row, i] = -np.inf  # the query image itself does not count
    top = topk(scores, 3)
    hits = np.array([[has(recs[j], c, s) for j in t] for t, (_, c, s) in zip(top, queries)])
    return float(hits.mean()), float(hits.any(1).mean())


def composite(emb, img, recs, queries, method: str, alpha: float, phrase: str) -> tuple[float, float]:
    from sfumato.search import compose

    colors = sorted({c for _, c, _ in queries})
    t = dict(zip(colors, emb.embed_texts([phrase.format(c) for c in colors])))
    empty = emb.embed_texts([""])[0]
    q = np.stack([compose(img[i], t[c], empty, alpha, method) for i, c, _ in queries])
    return composite_score(img, recs, queries, q)


def sweep(emb, n: int, seed: int, queries_n: int) -> list[dict]:
    images, _, recs = render(n, seed, emb.res)
    img = emb.embed_images(images)
    queries = composite_queries(recs, queries_n, seed)
    rows = []
    for method in ("delta", "sum"):
        for phrase in PHRASES:
            for alpha in ALPHAS:
                top3, any3 = composite(emb, img, recs, queries, method, alpha, phrase)
                rows.append({"method": method, "phrase": phrase, "alpha": alpha, "top3": top3, "any3": any3})
    return rows


def rank_settings(rows: list[dict]) -> list[dict]:
    """(method, alpha) by top-3 averaged over the phrasings: users type "blue" or "in blue"."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["alpha"]), []).append(r)
    ranked = [{"method": m, "alpha": a, "top3": float(np.mean([r["top3"] for r in g])),
               "any3": float(np.mean([r["any3"] for r in g])),
               **{f"top3 {r['phrase']!r}": r["top3"] for r in g}} for (m, a), g in groups.items()]
    return sorted(ranked, key=lambda r: -r["top3"])


def evaluate(emb, n: int, seed: int, queries_n: int, method: str, alpha: float, phrase: str) -> dict:
    from sfumato.clip import retrieval_metrics
    import torch

    t0 = time.time()
    images, captions, recs = render(n, seed, emb.res)
    img = emb.embed_images(images)
    out = attribute_queries(emb, img, recs)
    m = min(n, 1000)
    txt = emb.embed_texts(captions[:m])
    out.update(retrieval_metrics(torch.from_numpy(img[:m]), torch.from_numpy(txt), captions[:m]))
    out.update(zero_shot(emb, img, recs))
    queries = composite_queries(recs, queries_n, seed)
    out["composite_top3"], out["composite_any3"] = composite(emb, img, recs, queries, method, alpha, phrase)
    oracle = emb.embed_texts([f"a {c} {s}" for _, c, s in queries])
    out["composite_text_oracle_top3"] = composite_score(img, recs, queries, oracle)[0]
    out["composite_image_only_top3"] = composite_score(img, recs, queries, img[[i for i, _, _ in queries]])[0]
    out["composite_queries"] = float(len(queries))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> None:
    from sfumato.embedding import Embedder
    from sfumato.search import COMPOSITE_DEFAULT

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="Model folder with clip/.")
    ap.add_argument("--n", type=int, default=2000, help="Gallery images.")
    ap.add_argument("--seed", type=int, default=777, help="ShapesWorld seed of the held-out gallery.")
    ap.add_argument("--queries", type=int, default=800, help="Composite queries (at most the single-object images).")
    ap.add_argument("--sweep", action="store_true", help="Choose the composite method/alpha on seed + 1 first.")
    ap.add_argument("--out", type=Path, help="Write the results as JSON.")
    args = ap.parse_args(argv)
    emb = Embedder.load(args.model)
    result = {"model": str(args.model), "fingerprint": emb.fingerprint, "n": args.n, "seed": args.seed}
    method, alpha, phrase = COMPOSITE_DEFAULT["method"], COMPOSITE_DEFAULT["alpha"], "{}"
    if args.sweep:
        result["sweep"] = rows = rank_settings(sweep(emb, args.n, args.seed + 1, args.queries))
        for r in rows:
            per = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("top3 "))
            print(f"sweep {r['method']:<5} alpha {r['alpha']:<4} mean top3 {r['top3']:.3f} any3 {r['any3']:.3f}  {per}")
        best = result["best"] = rows[0]
        images, _, recs = render(args.n, args.seed, emb.res)
        img = emb.embed_images(images)
        queries = composite_queries(recs, args.queries, args.seed)
        result["eval_settings"] = [{"method": m, "alpha": a, "phrase": ph,
                                    "top3": composite(emb, img, recs, queries, m, a, ph)[0]}
                                   for m, a in {(best["method"], best["alpha"]), (method, alpha), ("sum", 1.0)}
                                   for ph in PHRASES]
    result["composite_default"] = {"method": method, "alpha": alpha, "phrase": phrase}
    result["metrics"] = evaluate(emb, args.n, args.seed, args.queries, method, alpha, phrase)
    for k, v in result["metrics"].items():
        print(f"{k:<34} {v:.4f}" if isinstance(v, float) else f"{k:<34} {v}")
    for r in result.get("eval_settings", []):
        print(f"eval split: composite top3 {r['method']:<5} alpha {r['alpha']:<4} {r['phrase']!r:<8} {r['top3']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
