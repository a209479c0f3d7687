"""ShapesWorld generator and checker speed on one core.

    python benchmarks/bench_shapesworld.py [--n 3000]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from sfumato.shapesworld import ShapesWorld  # noqa: E402


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    ds = ShapesWorld(args.n, seed=0)
    ds[0]  # warm the glyph cache
    scene_only = rate(lambda i: ds.scene(i), args.n)
    full = rate(lambda i: ds[i], args.n)
    print(f"scene sampling + captions : {scene_only:8.0f} scenes/s")
    print(f"scene + render (64 px)    : {full:8.0f} images/s   (target >= 1000)")
    ds128 = ShapesWorld(args.n, seed=0, res=128)
    print(f"scene + render (128 px)   : {rate(lambda i: ds128[i], args.n // 3):8.0f} images/s")
    try:
        from sfumato.shapesworld.checker import judge
    except ImportError:
        return
    items = [ds[i] for i in range(args.n // 3)]
    print(f"checker judge (64 px)     : {rate(lambda i: judge(items[i][0], items[i][1]), len(items)):8.0f} images/s")


if __name__ == "__main__":
    main()
