"""ShapesWorld as a stream (for training) and as a folder on disk (for everything else).

    sfumato data shapes --n 1000 --seed 0 --out data/shapes
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import UsageError
from ..files import publish_dir
from . import spec
from .render import Scene, make_scene, render


def _check_args(res: int, categories: tuple[str, ...]) -> None:
    if not 16 <= res <= 1024:
        raise UsageError(f"--res must be between 16 and 1024 px, got {res}")
    bad = [c for c in categories if c not in spec.CATEGORIES]
    if bad:
        raise UsageError(f"unknown category {bad[0]!r}; choose from {', '.join(spec.CATEGORIES)}")
    if not categories:
        raise UsageError("at least one category is needed")


class ShapesWorld:
    """`n` scenes (unbounded if None) yielding (image, caption, record) without touching disk.

    Indexable and shardable: rank r of w sees indices r, r + w, r + 2w, ...
    """

    def __init__(self, n: int | None = None, seed: int = 0, res: int = spec.BASE_RES,
                 categories: tuple[str, ...] | None = None, rank: int = 0, world_size: int = 1):
        self.categories = tuple(categories or spec.CATEGORIES)
        _check_args(res, self.categories)
        self.n, self.seed, self.res = n, seed, res
        self.rank, self.world_size = rank, world_size

    def scene(self, index: int) -> Scene:
        return make_scene(self.seed, index, self.categories)

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("an unbounded ShapesWorld has no length")
        return len(range(self.rank, self.n, self.world_size))

    def __getitem__(self, i: int) -> tuple[Image.Image, str, dict]:
        index = self.rank + i * self.world_size
        if self.n is not None and not 0 <= index < self.n:
            raise IndexError(i)
        s = self.scene(index)
        return render(s, self.res), s.caption, s.to_record(self.res)

    def __iter__(self) -> Iterator[tuple[Image.Image, str, dict]]:
        i = 0
        while self.n is None or self.rank + i * self.world_size < self.n:
            yield self[i]
            i += 1


def write_dataset(out: str | Path, n: int, seed: int = 0, res: int = spec.BASE_RES,
                  categories: tuple[str, ...] | None = None, overwrite: bool = False,
                  progress: bool = False) -> dict:
    """Write n scenes to `out` (PNG + TXT + JSON each, plus manifest.jsonl); return a summary.

    The folder is built beside `out` under a temporary name and renamed into place when complete,
    so an interrupted run never leaves a folder that looks like a finished data set.
    """
    out = Path(out)
    if n <= 0:
        raise UsageError(f"--n must be at least 1, got {n}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite to replace it")
    data = ShapesWorld(n, seed, res, categories)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        counts: Counter[str] = Counter()
        indices = range(n)
        if progress:
            from rich.progress import track

            indices = track(indices, description=f"rendering {n} scenes")
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as manifest:
            for i in indices:
                image, caption, record = data[i]
                name = f"{i:06d}"
                image.save(tmp / f"{name}.png", compress_level=1)
                (tmp / f"{name}.txt").write_text(caption, encoding="utf-8")
                (tmp / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
                manifest.write(json.dumps({"file": f"{name}.png", **record}) + "\n")
                counts[record["category"]] += 1
        summary = {"n": n, "seed": seed, "res": res, "categories": dict(sorted(counts.items()))}
        (tmp / "shapesworld.json").write_text(json.dumps({"version": 1, **summary}, indent=1))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
