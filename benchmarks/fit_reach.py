"""A copy of a model folder whose text tower carries each relation into the words after it.

    python benchmarks/fit_reach.py MODEL --out MODEL-reach --steps 300 --target 0.3 --keep 1

Trains `text_encoder/` with `sfumato.text_reach.fit_reach` (a relation flip should change the states
of the words after the relation by `--target`, relative; all other states stay near the old ones,
weight `--keep`) and writes MODEL's folder with the new tower to --out (the UNets unchanged, the ONNX
export left out). Prints the reach and drift at the first and the last step; `python
benchmarks/position_failures.py --model OUT --text` then compares a left/right swap with a colour swap.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import sfumato
    from sfumato.files import publish_dir
    from sfumato.text_reach import fit_reach

    torch.set_num_threads(args.threads)
    pipe = sfumato.load(args.model, onnx=False)
    t0 = time.time()
    tower, log = fit_reach(pipe.tokenizer, pipe.text_encoder, args.steps, args.target, args.keep, args.lr,
                           seed=args.seed)
    for row in (log[0], log[-1]):
        print(f"step {row['step']}: reach {row['reach']:.3f}, short {row['short']:.3f}, drift {row['drift']:.4f}")
    out, work = Path(args.out), Path(args.out + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.model, work, ignore=shutil.ignore_patterns("onnx", "*.partial", "text_encoder"))
    tower.save_pretrained(work / "text_encoder")
    publish_dir(work, out)
    print(f"{out}: {args.steps} steps in {time.time() - t0:.0f} s, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
