"""The CLIP study: every arm gets the same wall-clock budget, data and search evaluation.

    python benchmarks/clip_study.py prepare --out runs/clip-study                 # 30,000 pairs, once
    python benchmarks/clip_study.py probe --out runs/clip-study --threads 1       # samples/s of each arm
    taskset -c 0 python benchmarks/clip_study.py arm cont --out runs/clip-study --minutes 35 &
    taskset -c 1 python benchmarks/clip_study.py arm patch4 --out runs/clip-study --minutes 35 &
    python benchmarks/clip_study.py arm shipped --out runs/clip-study             # the reference: no training
    python benchmarks/clip_study.py report --out runs/clip-study --md docs/clip.md
    python benchmarks/clip_study.py ship --out runs/clip-study --run cont-s0 --into src/sfumato/assets/default-model

The data is what the shipped model was trained on: ShapesWorld, 30,000 pairs, seed 0, 64 px, the
same 5 % held out (`prepare` renders it once with sfumato.data.load_pairs_data). An arm is a list of
`--set` overrides of `clip.*` on the small preset, trained by sfumato's own CLIP stage
(stages.clip_stage on Engine.run: the loss, hard negatives, lr schedule and optimizer of `sfumato
train`), with the shipped model's tokenizer. Warm arms start from the shipped CLIP (`--init`): every
tensor must match by name and shape, except that a ViT of another patch size gets the patch
embedding and position embedding resized (FlexiViT / timm style). Each arm trains for `--minutes`
of wall-clock time, as steps = minutes x samples/s / batch from a `probe` of its speed with
`--threads` threads (one process per core: two arms side by side on two cores do not slow each
other), then writes MODEL/clip (a folder `eval_search.py --model` reads), its held-out CLIP metrics
(retrieval, hard-negative accuracy per edit kind, shape edits included) and the search metrics of
benchmarks/eval_search.py on a held-out gallery (seed 777): attribute-query P@10, composite top-3,
zero-shot shape / colour / count / digit.

Targets for replacing the shipped clip/: attr_P@10 >= 0.8, composite_top3 >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_BASE = ROOT / "src/sfumato/assets/default-model"
KINDS_ALL = "clip.negative_kinds=('swap_colors','swap_relation','count','digit','shape','color')"
TARGETS = {"attr_P@10": 0.8, "composite_top3": 0.7}

# name -> (start from the shipped CLIP, overrides of the small preset). The shipped recipe: ViT 3
# layers patch 8, text 3 layers, width 128, batch 128, lr 1e-3, warmup 200, one hard negative per
# caption (swapped colours / relation, count, digit; a plain colour change last).
ARMS: dict[str, tuple[bool, list[str]]] = {
    "shipped": (True, []),  # the shipped CLIP as it is, evaluated (no training)
    "cont": (True, []),  # the shipped recipe, trained on
    "scratch": (False, []),  # the shipped recipe from scratch (does the warm start matter?)
    "patch4": (True, ["clip.patch_size=4"]),  # 16x16 tokens; patch and position embeddings resized
    "patch4-scratch": (False, ["clip.patch_size=4"]),
    # harder negatives: shape edits too (the tower that knows little about shape), three per caption
    "hardneg": (True, ["clip.negatives=3", KINDS_ALL]),
    "shapeneg": (True, [KINDS_ALL]),  # shape edits, still one negative per caption
    "patch4-hardneg": (True, ["clip.patch_size=4", "clip.negatives=3", KINDS_ALL]),
    "lr3e-4": (True, ["clip.lr=0.0003", "clip.warmup=50"]),  # gentler continuation
    "batch256": (True, ["clip.batch_size=256"]),  # more in-batch negatives
}
# What sets an arm's speed; arms with the same signature share one probed figure (their mean).
SPEED_KEYS = ("embed_dim", "vision_width", "vision_layers", "patch_size", "text_width", "text_layers", "heads",
              "batch_size", "hard_negatives", "negatives", "negative_kinds")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------- data


def prepare(args) -> None:
    """Render the pairs once: images (uint8), captions and the held-out split, as training saw them."""
    from safetensors.torch import save_file

    from sfumato.config import get_preset
    from sfumato.data import load_pairs_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("small")
    cfg.data.shapes_n = args.pairs
    t0 = time.time()
    data = load_pairs_data("shapesworld", cfg.data, progress=False)
    save_file({"images": data.images.contiguous(), "holdout": torch.from_numpy(data.holdout)},
              str(out / "pairs.safetensors"))
    (out / "pairs.json").write_text(json.dumps({
        "pairs": len(data.captions), "seed": cfg.data.shapes_seed, "res": cfg.data.res, "holdout": cfg.data.holdout,
        "fingerprint": data.fingerprint, "source": data.source, "stats": data.stats, "captions": data.captions,
        "ids": data.ids}))
    base_fp = _card(Path(args.base)).get("data", {}).get("fingerprint")
    same = "the same pairs as" if base_fp == data.fingerprint else "NOT the pairs of"
    log(f"rendered {len(data.captions)} pairs ({len(data.val_idx)} held out) in {time.time() - t0:.0f} s: "
        f"{same} {args.base}")


def load_pairs(root: Path):
    from safetensors.torch import load_file

    from sfumato.data import PairData

    meta = json.loads((root / "pairs.json").read_text())
    t = load_file(str(root / "pairs.safetensors"))
    data = PairData(t["images"], meta["captions"], meta["ids"], t["holdout"].numpy(), meta["fingerprint"],
                    meta["source"], meta["stats"])
    return data, meta


def _card(model: Path) -> dict:
    path = model / "sfumato.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- models


def arm_config(arm: str, extra, meta: dict, seed: int = 0):
    from sfumato.config import apply_overrides, get_preset, validate

    cfg = get_preset("small")
    cfg.data.res, cfg.data.shapes_n = meta["res"], meta["pairs"]
    apply_overrides(cfg, ARMS[arm][1] + list(extra or []))
    cfg.seed = seed
    return validate(cfg)


def clip_folder(path: Path) -> Path:
    """A model folder's clip/, or the folder itself if it holds a CLIPModel."""
    return path / "clip" if (path / "clip" / "model.safetensors").is_file() else path


def new_clip(cfg, tok):
    from sfumato.models import build_clip

    if cfg.tokenizer.context_length != tok.model_max_length:
        raise SystemExit(f"tokenizer.context_length {cfg.tokenizer.context_length} != the tokenizer's "
                         f"{tok.model_max_length}")
    return build_clip(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


RESIZABLE = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight")


def load_init(clip, folder: Path) -> dict:
    """Start from a saved CLIPModel: every tensor by name and shape, or a SystemExit naming the first
    difference. Only a ViT of another patch size may differ, in two tensors, which are resized:
    the patch embedding by area (a flat-colour patch keeps its response: the kernel sum is kept) or
    bicubic interpolation, the position embedding's grid bicubically (its class row kept)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    path = clip_folder(folder) / "model.safetensors"
    if not path.is_file():
        raise SystemExit(f"--init: {path} does not exist")
    weights = load_file(str(path))
    own = clip.state_dict()
    if set(weights) != set(own):
        diff = sorted(set(weights) ^ set(own))
        raise SystemExit(f"--init: {path} has another architecture (first differing tensor: {diff[0]})")
    resized = {}
    for k, w in weights.items():
        if w.shape == own[k].shape:
            continue
        if k not in RESIZABLE:
            raise SystemExit(f"--init: {path} has another architecture ({k}: {tuple(w.shape)} here "
                             f"{tuple(own[k].shape)})")
        if k.endswith("patch_embedding.weight"):  # (D, 3, p, p)
            p_old, p_new = w.shape[-1], own[k].shape[-1]
            mode = "area" if p_new < p_old else "bicubic"
            kw = {} if mode == "area" else {"align_corners": False}
            weights[k] = F.interpolate(w, size=(p_new, p_new), mode=mode, **kw) * (p_old / p_new) ** 2
        else:  # (1 + g*g, D)
            g_old, g_new = round((w.shape[0] - 1) ** 0.5), round((own[k].shape[0] - 1) ** 0.5)
            grid = w[1:].reshape(g_old, g_old, -1).permute(2, 0, 1)[None]
            grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
            weights[k] = torch.cat([w[:1], grid[0].permute(1, 2, 0).reshape(g_new * g_new, -1)])
        resized[k] = [list(w.shape), list(own[k].shape)]
    clip.load_state_dict(weights, strict=True)
    return {"from": str(path.parent.resolve()), "resized": resized}


def probed_speed(root: Path, cfg, threads: int) -> float | None:
    """Mean samples/s of every probe with the same speed signature and thread count."""
    sig = speed_signature(cfg)
    found = [e["samples_per_s"] for f in root.glob("probe-*.json") for e in json.loads(f.read_text())
             if e["threads"] == threads and e["signature"] == sig]
    return round(sum(found) / len(found), 1) if found else None


def speed_signature(cfg) -> list:
    return json.loads(json.dumps([getattr(cfg.clip, k) for k in SPEED_KEYS] + [cfg.data.res]))


# ---------------------------------------------------------------- probe / arm


def probe(args) -> None:
    """Training samples/s of each arm with `--threads` threads: sfumato's CLIP loss on the cached
    pairs, hard negatives included, a few steps each (after two untimed ones)."""
    from sfumato.models import quiet_libraries
    from sfumato.stages import clip_stage
    from sfumato.tokenizer import encode, load_tokenizer

    torch.set_num_threads(args.threads)
    quiet_libraries()
    root = Path(args.out)
    data, meta = load_pairs(root)
    tok = load_tokenizer(clip_folder(Path(args.base)))
    ids, _ = encode(tok, data.captions)
    arms = args.arms.split(",")
    entries, seen = [], set()
    for arm in arms:
        cfg = arm_config(arm, args.set, meta)
        if json.dumps(speed_signature(cfg)) in seen:  # as fast as an arm just probed: shares its figure
            continue
        seen.add(json.dumps(speed_signature(cfg)))
        clip = new_clip(cfg, tok)
        spec = clip_stage(cfg, data, tok, ids, clip, torch.device("cpu"))
        opt = torch.optim.AdamW(spec.model.parameters(), 1e-4)
        for i in range(2 + args.probe_steps):
            if i == 2:
                t0 = time.perf_counter()
            loss, _ = spec.loss_fn(spec.model, torch.Generator().manual_seed(i))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rate = round(args.probe_steps * cfg.clip.batch_size / (time.perf_counter() - t0), 1)
        entries.append({"arm": arm, "set": list(args.set or []), "threads": args.threads, "samples_per_s": rate,
                        "signature": speed_signature(cfg)})
        log(f"{arm}{' ' + ' '.join(args.set) if args.set else ''}: {rate} samples/s with {args.threads} thread(s)")
    tag = "+".join(arms) + (f"-{args.tag}" if args.tag else "")
    (root / f"probe-{tag}-t{args.threads}.json").write_text(json.dumps(entries, indent=1))


def run_arm(args) -> None:
    from sfumato.clip import hard_negative_accuracy
    from sfumato.config import to_dict
    from sfumato.data import to_model_range
    from sfumato.engine import Engine
    from sfumato.models import quiet_libraries
    from sfumato.stages import EVAL_PAIRS, clip_stage, save_clip
    from sfumato.tokenizer import encode, load_tokenizer

    torch.set_num_threads(args.threads)
    quiet_libraries()
    root = Path(args.out)
    data, meta = load_pairs(root)
    base = Path(args.base)
    if args.arm == "shipped":
        args.minutes, args.steps = 0, None
    if args.steps is not None:
        args.minutes = None  # a fixed number of steps, not a budget
    cfg = arm_config(args.arm, args.set, meta, args.seed)
    overrides = ARMS[args.arm][1] + list(args.set or [])
    warm = (ARMS[args.arm][0] or bool(args.init)) and not args.scratch
    name = f"{args.arm}-s{args.seed}" + (f"-{args.tag}" if args.tag else "")
    work = root / name
    if args.steps is not None:
        steps, probed = args.steps, None
    elif args.minutes == 0:
        steps, probed = 0, None
    else:
        probed = probed_speed(root, cfg, args.threads)
        if probed is None:
            raise SystemExit(f"no probe of {args.arm}{' with ' + ' '.join(args.set) if args.set else ''} with "
                             f"{args.threads} thread(s): run `probe --arms {args.arm}"
                             + "".join(f" --set {s}" for s in args.set or []) + f" --threads {args.threads}` first")
        steps = max(1, int(args.minutes * 60 * probed / cfg.clip.batch_size))
    cfg.clip.steps = max(1, steps)

    tok = load_tokenizer(clip_folder(base))
    ids, _ = encode(tok, data.captions)
    torch.manual_seed(args.seed)
    clip = new_clip(cfg, tok)
    init = load_init(clip, Path(args.init) if args.init else base) if warm else None
    params = sum(p.numel() for p in clip.parameters())
    shutil.rmtree(work, ignore_errors=True)  # only now: a refused arm leaves an earlier run of it alone
    (work / "logs").mkdir(parents=True)
    log(f"{name}: {params / 1e6:.2f} M parameters, {steps} steps of {cfg.clip.batch_size} "
        f"({args.minutes} min at {probed} samples/s), {args.threads} thread(s), "
        f"{'warm from ' + init['from'] if init else 'from scratch'}"
        f"{', resized ' + ', '.join(init['resized']) if init and init['resized'] else ''}, overrides {overrides}")

    spec = clip_stage(cfg, data, tok, ids, clip, torch.device("cpu"))
    held_out = spec.eval_fn  # run after the timed training, not inside it
    spec.eval_fn = None
    train_s = 0.0
    if steps:
        engine = Engine(work, cfg.seed, cfg.mixed_precision, checkpoint_every=steps, eval_every=steps,
                        log_every=25, progress=False)
        t0 = time.perf_counter()
        last = engine.run(spec)
        train_s = time.perf_counter() - t0
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # model/clip holds the weights
        log(f"{name}: {steps} steps in {train_s:.0f} s, {steps * cfg.clip.batch_size / train_s:.1f} samples/s, "
            f"loss {last.get('loss', float('nan')):.3f}")
    clip.eval()
    save_clip(clip, tok, cfg.data.res, work / "model" / "clip")

    t0 = time.perf_counter()
    held = held_out(steps) if held_out else {}
    val = data.val_idx[:EVAL_PAIRS]
    if len(val):
        held.update(hard_negative_accuracy(clip, tok, to_model_range(data.images[val]),
                                           [data.captions[i] for i in val], kinds=("shape",)))
    search = evaluate_search(work / "model", args)
    result = {"arm": args.arm, "seed": args.seed, "tag": args.tag, "overrides": overrides, "init": init,
              "minutes": args.minutes, "threads": args.threads, "steps": steps, "samples_per_s": probed,
              "samples_per_s_this_run": round(steps * cfg.clip.batch_size / train_s, 1) if train_s else None,
              "train_seconds": round(train_s), "eval_seconds": round(time.perf_counter() - t0),
              "params_m": round(params / 1e6, 3), "held_out_pairs": int(len(val)), "data": {k: meta[k] for k in ("pairs", "seed", "res", "fingerprint")},
              "config": to_dict(cfg), "clip": held, **search}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    m = search["search"]
    log(f"{name}: attr P@10 {m['attr_P@10']:.3f}, composite top3 {m['composite_top3']:.3f}, zs shape "
        f"{m['zs_shape']:.3f}, zs colour {m['zs_color']:.3f}, swap colours {held.get('hard_negative_swap_colors_acc', float('nan')):.3f}, "
        f"swap relation {held.get('hard_negative_swap_relation_acc', float('nan')):.3f}, shape edit "
        f"{held.get('hard_negative_shape_acc', float('nan')):.3f}")


def evaluate_search(model: Path, args) -> dict:
    """benchmarks/eval_search.py's measurements of MODEL/clip (its held-out gallery, default composite)."""
    import eval_search
    from sfumato.embedding import Embedder
    from sfumato.search import COMPOSITE_DEFAULT

    emb = Embedder.load(model)
    method, alpha = COMPOSITE_DEFAULT["method"], COMPOSITE_DEFAULT["alpha"]
    out = {"fingerprint": emb.fingerprint, "eval": {"n": args.eval_n, "seed": args.eval_seed,
                                                    "queries": args.queries, "method": method, "alpha": alpha}}
    if args.sweep:  # the composite setting that suits this CLIP, chosen on seed + 1
        rows = eval_search.rank_settings(eval_search.sweep(emb, args.eval_n, args.eval_seed + 1, args.queries))
        out["sweep_best"] = rows[0]
    out["search"] = eval_search.evaluate(emb, args.eval_n, args.eval_seed, args.queries, method, alpha, "{}")
    if args.sweep:
        images, _, recs = eval_search.render(args.eval_n, args.eval_seed, emb.res)
        img = emb.embed_images(images)
        queries = eval_search.composite_queries(recs, args.queries, args.eval_seed)
        best = out["sweep_best"]
        out["search"]["composite_top3_swept"] = eval_search.composite(emb, img, recs, queries, best["method"],
                                                                      best["alpha"], "{}")[0]
    return out


# ---------------------------------------------------------------- report / ship


def report(args) -> None:
    """A markdown table of every finished arm."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/result.json"))]
    cols = [("attr P@10", "search", "attr_P@10"), ("attr exact P@10", "search", "attr_exact_P@10"),
            ("composite top-3", "search", "composite_top3"), ("zs shape", "search", "zs_shape"),
            ("zs colour", "search", "zs_color"), ("zs count", "search", "zs_count"), ("zs digit", "search", "zs_digit"),
            ("t→i match R@1", "search", "text_to_image_match_R@1"),
            ("hn swap colours", "clip", "hard_negative_swap_colors_acc"),
            ("hn swap relation", "clip", "hard_negative_swap_relation_acc"),
            ("hn count", "clip", "hard_negative_count_acc"), ("hn shape", "clip", "hard_negative_shape_acc")]
    if any("composite_top3_swept" in r["search"] for r in rows):
        cols.insert(3, ("composite top-3 swept", "search", "composite_top3_swept"))
    head = "| arm | init | min | samples/s | steps | " + " | ".join(c[0] for c in cols) + " | targets |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    settings = {json.dumps([r["eval"], r.get("held_out_pairs")]) for r in rows}
    for r in rows:
        init = r.get("init")
        how = "scratch" if not init else ("warm, resized" if init.get("resized") else "warm")
        met = all(r["search"].get(k, 0) >= v for k, v in TARGETS.items())
        cells = [f"{r[sec].get(key, float('nan')):.3f}" for _, sec, key in cols]
        minutes = "" if r["minutes"] is None else r["minutes"]
        lines.append(f"| {r['arm']}-s{r['seed']}{'-' + r['tag'] if r.get('tag') else ''} | {how} | {minutes} | "
                     f"{r['samples_per_s'] or ''} | {r['steps']} | " + " | ".join(cells) + f" | {'met' if met else ''} |")
    n = rows[0]["eval"] if rows else {}
    text = ("Search metrics (benchmarks/eval_search.py) on a held-out gallery of "
            f"{n.get('n')} ShapesWorld images (seed {n.get('seed')}), composite {n.get('method')} alpha "
            f"{n.get('alpha')}; hard-negative accuracies (hn) on {rows[0].get('held_out_pairs') if rows else ''} "
            "held-out training pairs. Targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()) + ".\n\n"
            + ("**The arms were not all measured alike (gallery, queries or held-out pairs differ).**\n\n"
               if len(settings) > 1 else "") + "\n".join(lines) + "\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)


def ship(args) -> None:
    """Replace MODEL/clip by a run's CLIP and record it in MODEL/sfumato.json. Only clip/ changes: the
    UNet's prompt encoder (text_encoder/) and tokenizer/ stay, and the tokenizer must be the same."""
    from sfumato.files import file_sha256

    run = Path(args.out) / args.run
    result = json.loads((run / "result.json").read_text())
    new, target = run / "model" / "clip", Path(args.into)
    old = target / "clip"
    from sfumato.tokenizer import load_tokenizer

    a, b = load_tokenizer(old), load_tokenizer(new)
    if a.get_vocab() != b.get_vocab() or a.model_max_length != b.model_max_length:
        raise SystemExit(f"{new} has another tokenizer than {old}")
    new_cfg, old_cfg = json.loads((new / "config.json").read_text()), json.loads((old / "config.json").read_text())
    if new_cfg["vision_config"]["image_size"] != old_cfg["vision_config"]["image_size"]:
        raise SystemExit("the run's CLIP sees another image size than the model's")
    old_fp = file_sha256(old / "model.safetensors")
    tmp, trash = target / ".clip.new", target / ".clip.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.copytree(new, tmp)
    old.rename(trash)
    tmp.rename(old)
    shutil.rmtree(trash)
    card = _card(target)
    if card:
        history = card.setdefault("clip_history", [{"config": card["config"]["clip"],
                                                    "seconds": card["seconds"]["clip"]}])
        history.append({"config": result["config"]["clip"], "seconds": result["train_seconds"], "steps": result["steps"],
                        "threads": result["threads"], "init": result["init"], "run": f"benchmarks/clip_study.py arm "
                        f"{result['arm']} --minutes {result['minutes']} " + " ".join(f"--set {s}" for s in
                                                                                   result["overrides"]),
                        "note": "clip/ only: text_encoder/ (the UNet's prompt encoder) is the earlier CLIP's text tower"})
        card["config"]["clip"] = result["config"]["clip"]
        card["seconds"]["clip"] = round(sum(h["seconds"] for h in history), 1)
        card["metrics"]["clip"] = result["clip"]
        card["metrics"]["search"] = {"eval": result["eval"], **result["search"]}
        (target / "sfumato.json").write_text(json.dumps(card, indent=1))
    log(f"shipped {args.run} into {old}: CLIP fingerprint {old_fp[:12]} -> {result['fingerprint'][:12]}; "
        "indexes built with the old clip/ now refuse this model (rebuild them with `sfumato index build`)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "probe", "arm", "report", "ship"))
    p.add_argument("arm", nargs="?", choices=tuple(ARMS))
    p.add_argument("--out", default="runs/clip-study")
    p.add_argument("--base", default=str(DEFAULT_BASE), help="the model whose tokenizer (and CLIP, for warm arms) "
                   "the arms use")
    p.add_argument("--pairs", type=int, default=30_000, help="prepare: ShapesWorld pairs (seed 0, 64 px)")
    p.add_argument("--minutes", type=float, default=35, help="arm: wall-clock budget (0: evaluate only)")
    p.add_argument("--steps", type=int, default=None, help="arm: this many steps instead of the budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", help="extra section.key=value overrides for this arm")
    p.add_argument("--tag", default="", help="suffix of the arm's folder (for --set variants) or probe file")
    p.add_argument("--init", default="", help="arm: start from this CLIP (a model folder or its clip/; "
                   "warm arms default to --base)")
    p.add_argument("--scratch", action="store_true", help="arm: do not start from a saved CLIP")
    p.add_argument("--eval-n", type=int, default=2000, help="arm: held-out gallery images")
    p.add_argument("--eval-seed", type=int, default=777, help="arm: ShapesWorld seed of the gallery")
    p.add_argument("--queries", type=int, default=800, help="arm: composite queries")
    p.add_argument("--sweep", action="store_true", help="arm: also tune the composite method/alpha on seed + 1")
    p.add_argument("--probe-steps", type=int, default=8, help="probe: timed steps per arm")
    p.add_argument("--arms", default=",".join(a for a in ARMS if a != "shipped"),
                   help="probe: comma-separated arm names (one probe per distinct speed signature)")
    p.add_argument("--md", default="", help="report: also write the table here")
    p.add_argument("--run", default="", help="ship: the arm folder, e.g. cont-s0")
    p.add_argument("--into", default="", help="ship: the model folder whose clip/ is replaced")
    args = p.parse_args(argv)
    if args.command == "arm" and not args.arm:
        p.error("arm needs an arm name")
    if args.command == "ship" and not (args.run and args.into):
        p.error("ship needs --run and --into")
    {"prepare": prepare, "probe": probe, "arm": run_arm, "report": report, "ship": ship}[args.command](args)


if __name__ == "__main__":
    main()
