"""Measure the embedding space's speed: images embedded per second, query latency and recall@10 of
each index kind against exact search, index build time and size on disk.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_search.py --model MODEL
    ... --million            # also 1M random vectors (minutes: HNSW and IVF-PQ builds)

Vectors are random unit vectors of the model's dimension (or --dim): "uniform" (no structure, the
hardest case for approximate search) and "clustered" (unit vectors around 1000 centres, closer to
real embeddings). Latency is one query at a time, as `sfumato search` runs, on the threads allowed
by OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sfumato.evaluate import recall_at_k  # noqa: E402
from sfumato.index import IndexWriter, KINDS, disk_size, make_vector_index, unit  # noqa: E402


def vectors(n: int, d: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    centres = unit(np.random.default_rng(1234).standard_normal((1000, d)))
    for s in range(0, n, 100_000):  # in chunks to bound memory
        m = min(100_000, n - s)
        x = rng.standard_normal((m, d)).astype(np.float32)
        if kind == "clustered":
            x = centres[rng.integers(1000, size=m)] + 0.35 * x / np.sqrt(d)
        out[s:s + m] = unit(x)
    return out


def bench_embedding(model: Path, n: int) -> dict:
    from sfumato.embedding import Embedder
    from sfumato.shapesworld import ShapesWorld

    emb = Embedder.load(model)
    images = [ShapesWorld(n, seed=7, res=emb.res)[i][0] for i in range(n)]
    emb.embed_images(images[:16])  # warm up
    t = time.perf_counter()
    emb.embed_images(images, batch_size=64)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    emb.embed_texts(["a red circle to the left of a blue square"] * 256)
    dt_text = time.perf_counter() - t
    return {"model": str(model), "dim": emb.dim, "image_size": emb.res, "images": n,
            "images_per_s": round(n / dt, 1), "texts_per_s": round(256 / dt_text, 1)}


def bench_index(n: int, d: int, data: str, kinds, queries: int = 200, store: bool = True) -> list[dict]:
    x = vectors(n, d, data)
    q = vectors(queries, d, data, seed=99)
    truth = None
    out = []
    for kind in kinds:
        idx = make_vector_index(kind, d)
        t = time.perf_counter()
        idx.add(np.arange(n), x)
        build_s = time.perf_counter() - t
        lat, found = [], []
        for i in range(queries):
            t = time.perf_counter()
            _, ids = idx.search(q[i:i + 1], 10)
            lat.append(time.perf_counter() - t)
            found.append(ids[0])
        found = np.stack(found)
        if kind == "flat":
            truth = found
        row = {"n": n, "dim": d, "data": data, "kind": kind, "build_s": round(build_s, 2),
               "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
               "p99_ms": round(1000 * float(np.percentile(lat, 99)), 3),
               "recall@10_vs_flat": round(recall_at_k(found, truth, 10), 4) if truth is not None else None,
               "params": getattr(idx, "params", {})}
        if store:
            row.update(_store(idx, n, d))
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def _store(idx, n: int, d: int) -> dict:
    """Commit the built index with n metadata rows; time the commit and the reopen, and the size."""
    from sfumato.index import open_index

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ix"
        rows = [{"path": f"/data/images/{i:08d}.png", "caption": "a red circle to the left of a blue square",
                 "width": 64, "height": 64, "sha256": f"{i:064x}"} for i in range(n)]
        with IndexWriter(path, create=True) as w:
            w.reset({"path": "bench", "fingerprint": "0" * 64}, d, idx.kind, getattr(idx, "params", None))
            w.vectors = idx
            w.db.executemany("INSERT INTO items (id, path, caption, width, height, sha256, added) VALUES "
                             "(?, ?, ?, ?, ?, ?, '2025-01-01')",
                             [(i, r["path"], r["caption"], r["width"], r["height"], r["sha256"])
                              for i, r in enumerate(rows)])
            w.manifest["next_id"] = n
            t = time.perf_counter()
            w.commit()
            commit_s = time.perf_counter() - t
        t = time.perf_counter()
        open_index(path)
        open_s = time.perf_counter() - t
        return {"commit_s": round(commit_s, 2), "open_s": round(open_s, 2),
                "disk_mb": round(disk_size(path) / 2**20, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Model folder; measures images embedded per second.")
    ap.add_argument("--dim", type=int, default=0, help="Vector dimension (default: the model's, else 128).")
    ap.add_argument("--images", type=int, default=512, help="Images to embed for the throughput number.")
    ap.add_argument("--n", type=int, default=10_000, help="Vectors in the small index benchmark.")
    ap.add_argument("--million", action="store_true", help="Also run 1M random vectors (takes minutes).")
    ap.add_argument("--out", type=Path, help="Write all numbers to this JSON file.")
    args = ap.parse_args(argv)
    import torch

    results: dict = {"threads": torch.get_num_threads()}
    if args.model:
        results["embedding"] = bench_embedding(args.model, args.images)
        print(json.dumps(results["embedding"]), flush=True)
    d = args.dim or results.get("embedding", {}).get("dim", 128)
    results["index"] = bench_index(args.n, d, "uniform", KINDS) + bench_index(args.n, d, "clustered", KINDS)
    if args.million:
        results["index"] += bench_index(1_000_000, d, "uniform", KINDS, queries=100, store=False)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
