"""The UNet training-recipe study: every arm gets the same wall-clock budget, data and evaluation.

    python benchmarks/recipe_study.py prepare --out runs/study                 # data + caches, once
    python benchmarks/recipe_study.py probe --out runs/study --threads 1       # samples/s of each arm
    taskset -c 0 python benchmarks/recipe_study.py arm baseline --out runs/study --minutes 10 &
    taskset -c 1 python benchmarks/recipe_study.py arm vflat --out runs/study --minutes 10 &
    python benchmarks/recipe_study.py report --out runs/study --md docs/recipe.md

An arm is a list of `--set` overrides on the small preset. The tokenizer, text tower and VAE are
taken from a base model (the shipped one by default) so the arms differ only in the UNet recipe.
Each arm trains for `--minutes` of wall-clock time (as steps, from a quiet-machine `probe` of its
samples/s) with `--threads` torch threads (one process per
core: two arms side by side on two cores do not slow each other, unlike two 2-thread processes),
then writes its model folder, the counterfactual sensitivity of raw and EMA weights, the held-out
x0 error per noise band, and `sfumato eval compositional` pass rates at fixed seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# What the arms change: the small preset's UNet recipe as the study began (the preset has since taken
# the winning levers, so they are pinned here to keep every round's arms as they were run).
STUDY_BASE = ["unet.snr_gamma=5", "unet.timestep_sampling=uniform", "unet.text_time_embedding=False",
              "unet.lr=0.0005", "unet.warmup=200", "unet.text_encoder_lr=0"]

# round 8's recipe, which later arms start from
LOWNOISE = ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
            "unet.text_time_embedding=True", "unet.text_encoder_lr=0.001", "unet.uniform_share=0.5"]

ARMS: dict[str, list[str]] = {
    "baseline": [],  # the recipe the study began with: v-prediction, min-SNR-5, uniform t, lr 5e-4, batch 64
    "vflat": ["unet.snr_gamma=0"],  # plain v-MSE: high noise keeps its weight
    "highnoise": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5"],
    "lr2e-3": ["unet.lr=0.002", "unet.warmup=200"],
    "texttime": ["unet.text_time_embedding=True"],
    "wide": ["unet.channels=(48,96,96)"],
    "attn3": ["unet.attention_levels=(True,True,True)"],
    "batch32": ["unet.batch_size=32"],
    # more of the categories nobody passes yet (the cache's pairs re-weighted, see run_arm)
    "hardmix": ["data.shapes_mix=two_objects=2,counting=2,position=2,attribute_binding=2,text=2"],
    # the levers that helped, together
    "combined": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
                 "unet.text_time_embedding=True"],
    # combined, with attention (self and cross) also at the 16x16 level, where objects are placed;
    # grown from a UNet without it by unet.init (the new layers start as identities)
    "attn16": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
               "unet.text_time_embedding=True", "unet.attention_levels=(True,True,True)"],
    # combined, with two transformer blocks per attention layer (8x8, 4x4 and the middle), so each
    # object's region reads the prompt a second time; grown like attn16
    "deepattn": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
                 "unet.text_time_embedding=True", "unet.transformer_layers=2"],
    # combined, with the text tower trained along at the UNet's learning rate: the causal tower's later
    # tokens carry the first-named object too, and the UNet reads the first object twice as much
    "texttrain": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
                  "unet.text_time_embedding=True", "unet.text_encoder_lr=0.001"],
    # texttrain with three times the share of the two categories still under 0.3 (position, digits)
    "texthard": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5",
                 "unet.text_time_embedding=True", "unet.text_encoder_lr=0.001", "data.shapes_mix=position=3,text=3"],
    # texttrain with half of each batch's noise levels drawn uniformly: the high-noise sampler leaves
    # t < 200 3 % of the steps, and one-step x0 from t = 100 passes the checker 1.00 for colours but
    # 0.17 for digits
    "lownoise": [*LOWNOISE],
    # lownoise with the token-grounding loss: each object word's cross-attention is asked to stay
    # inside its object's box (TokenCompose), so the side an object goes to is taught directly
    "ground": [*LOWNOISE, "unet.grounding_weight=0.1"],
    # lownoise with its noise levels leaning low (median t/T 0.27 in the logit-normal half), the
    # standard mix: digitlow's timestep change alone
    "lowt": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=-1.0",
             "unet.text_time_embedding=True", "unet.text_encoder_lr=0.001", "unet.uniform_share=0.5"],
    # lownoise, and lownoise with the grounding loss, each with the UNet's input centred and conv_in
    # widened to the whole latent, so every cell knows where it is (grown from a saved UNet by unet.init)
    "posin": [*LOWNOISE, "unet.position_input=True"],
    "posground": [*LOWNOISE, "unet.position_input=True", "unet.grounding_weight=0.1"],
    # posground with the grounding loss at full weight on the high-noise steps only (t >= 700): there
    # the latent cannot show where an object is, so attention in the right box has to come from the
    # prompt's relation and the cell's place
    "groundhigh": [*LOWNOISE, "unet.position_input=True", "unet.grounding_weight=1.0", "unet.grounding_min_t=700"],
    # lownoise with the text tower's causal mask lifted (sfumato.models.bidirectional_text_encoder): in a
    # causal tower the first-named object's tokens never see the relation that follows them
    "bidir": [*LOWNOISE, "unet.text_bidirectional=True"],
    # round 8b's texthard (three times the position and digit pairs) with the relation-contrast loss:
    # a position pair's latent is denoised again under a caption with another relation, and that
    # error must exceed the true caption's by 5 %
    "contrast": [*LOWNOISE, "data.shapes_mix=position=3,text=3", "unet.relation_contrast=1.0"],
    # lownoise with three times the digit pairs: after digitlow, to bring the layout back while the
    # digits keep some practice
    "digitkeep": [*LOWNOISE, "data.shapes_mix=text=3"],
    # digitkeep with the bidirectional tower (bidir's binding gain), grown from the digit chain
    "bidirkeep": [*LOWNOISE, "data.shapes_mix=text=3", "unet.text_bidirectional=True"],
    # digitkeep with the grounding loss at 0.1: sharper word maps for layout search to read
    "groundkeep": [*LOWNOISE, "data.shapes_mix=text=3", "unet.grounding_weight=0.1"],
    # practice, as digitlow was for digits: half the pairs name a relation (position x9), the layout
    # recipe's noise levels (relations are decided at high noise, not low)
    "posheavy": [*LOWNOISE, "data.shapes_mix=position=9"],
    # a diagnostic, not a recipe: lownoise with half the pairs digits and the noise levels leaning low
    # (median t/T 0.27 in the logit-normal half). Does the UNet learn to finish digit strokes when
    # most of its practice is just that?
    "digitlow": ["unet.snr_gamma=0", "unet.timestep_sampling=logit_normal", "unet.logit_mean=-1.0",
                 "unet.text_time_embedding=True", "unet.text_encoder_lr=0.001", "unet.uniform_share=0.5",
                 "data.shapes_mix=text=9"],
}


def study_cfg(arm: str, extra=None):
    """The small preset with the study's base recipe, the arm's overrides and then `extra`."""
    from sfumato.config import apply_overrides, get_preset

    return apply_overrides(get_preset("small"), STUDY_BASE + ARMS[arm] + list(extra or []))


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def load_base(base: Path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from sfumato.models import load_text_encoder

    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    te = load_text_encoder(base / "text_encoder").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base / "vae").eval().requires_grad_(False)
    return tok, te, vae


def prepare(args) -> None:
    """Render the pairs and cache latents and text states once for every arm."""
    from safetensors.torch import save_file

    from sfumato.config import get_preset
    from sfumato.data import load_pairs_data
    from sfumato.diffusion import cache_latents, cache_text, caption_ids
    from sfumato.token_grounding import grounding_targets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("small")
    cfg.data.shapes_n = args.pairs
    data = load_pairs_data("shapesworld", cfg.data)
    tok, te, vae = load_base(Path(args.base))
    mean, std = cache_latents(vae, data.images)
    states, rows, empty = cache_text(tok, te, data.captions)
    ids, _, empty_ids = caption_ids(tok, data.captions)  # for arms that train the text tower
    assign, boxes, _ = grounding_targets(tok, data.captions, data.records, ids.shape[1])  # for the grounding loss
    save_file({k: v.contiguous() for k, v in {"mean": mean, "std": std, "states": states, "rows": rows, "empty": empty,
               "ids": ids, "empty_ids": empty_ids, "holdout": torch.as_tensor(data.holdout),
               "ground_assign": assign, "ground_boxes": boxes}.items()},
              str(out / "cache.safetensors"))
    (out / "cache.json").write_text(json.dumps({"base": str(Path(args.base).resolve()), "pairs": args.pairs,
                                                "scaling": vae.config.scaling_factor}))
    log(f"cached {len(data.captions)} pairs, {len(states)} distinct captions")


def probe(args) -> None:
    """Training samples/s of each arm with `--threads` threads, on synthetic batches (seconds each).

    Arms are then given steps = minutes x samples/s / batch: the same wall-clock budget on a quiet
    machine, and a fair one even when something else runs while they train."""
    from sfumato.models import build_unet, quiet_libraries
    from sfumato.token_grounding import grounding_loss, recording_attention

    torch.set_num_threads(args.threads)
    quiet_libraries()
    path = Path(args.out) / f"probe-{args.arms.replace(',', '+')}.json"  # one file per probe process
    runs: dict[str, list[float]] = {}
    _, te, _ = load_base(Path(args.base))
    for arm in args.arms.split(","):  # interleave repeats (a,b,a,b) so drifts in machine load hit both
        cfg = study_cfg(arm)
        unet = build_unet(cfg, 16, 128).to(memory_format=torch.channels_last)
        trains_text = cfg.unet.text_encoder_lr > 0
        opt = torch.optim.AdamW(list(unet.parameters()) + (list(te.parameters()) if trains_text else []), 1e-4)
        te.requires_grad_(trains_text)
        b = cfg.unet.batch_size
        x = torch.randn(b, 4, 16, 16).to(memory_format=torch.channels_last)
        t, ids = torch.randint(0, 1000, (b,)), torch.randint(0, te.config.vocab_size, (b, 32))
        with torch.no_grad():
            fixed = te(ids)[0]
        grounded = cfg.unet.grounding_weight > 0
        assign = torch.randint(0, 4, (b, 32), dtype=torch.uint8)
        boxes = torch.tensor([[8, 8, 30, 30], [34, 34, 56, 56], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int16).expand(b, 4, 4)
        for i in range(25):
            if i == 5:
                t0 = time.perf_counter()
            ctx = te(ids)[0] if trains_text else fixed
            with recording_attention(unet) if grounded else contextlib.nullcontext() as rec:
                loss = unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean()
            if grounded:
                loss = loss + grounding_loss(rec.probs, assign, boxes, 64, torch.ones(b, dtype=torch.bool))
            loss.backward()
            opt.step()
            opt.zero_grad()
        rate = 20 * b / (time.perf_counter() - t0)
        runs.setdefault(f"{arm}/{args.threads}", []).append(rate)
        log(f"{arm}: {rate:.1f} samples/s with {args.threads} thread(s)")
    # an arm named more than once gets the mean of its probes (single probes spread by +-15 %)
    known = {k: round(sum(v) / len(v), 1) for k, v in runs.items()}
    path.write_text(json.dumps(known, indent=1))


def _shape(arm: str, extra=None) -> tuple:
    """What sets an arm's training speed: the UNet's architecture and the batch size."""
    u = study_cfg(arm, extra).unet
    return (tuple(u.channels), u.layers_per_block, tuple(u.attention_levels), u.head_dim, u.text_time_embedding,
            u.transformer_layers, u.batch_size, u.text_encoder_lr > 0, u.grounding_weight > 0,
            u.position_input, u.relation_contrast > 0)


def run_arm(args) -> None:
    import numpy as np
    from safetensors.torch import load_file

    from sfumato.config import to_dict
    from sfumato.diffusion import LatentBatches, PromptUNet, band_metrics, ema_copy, make_ema, unet_loss
    from sfumato.engine import get_lr
    from sfumato.evaluate import counterfactual_sensitivity, evaluate_compositional
    from sfumato.models import build_sample_scheduler, build_train_scheduler, build_unet, quiet_libraries
    from sfumato.pipeline import load

    torch.set_num_threads(args.threads)
    quiet_libraries()
    root = Path(args.out)
    meta = json.loads((root / "cache.json").read_text())
    c = load_file(str(root / "cache.safetensors"))
    base = Path(meta["base"])
    cfg = study_cfg(args.arm, args.set)
    cfg.seed = args.seed
    name = f"{args.arm}-s{args.seed}" + (f"-{args.tag}" if args.tag else "")
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    torch.manual_seed(args.seed)
    scheduler = build_train_scheduler(cfg)
    tok, te, vae = load_base(base)
    if args.tower:  # an arm that trains on from another run starts from that run's tower too
        from sfumato.models import load_text_encoder

        te = load_text_encoder(args.tower).eval().requires_grad_(False)
    if cfg.unet.text_bidirectional:
        from sfumato.models import bidirectional_text_encoder

        te = bidirectional_text_encoder(te).eval().requires_grad_(False)
    unet = build_unet(cfg, c["mean"].shape[-1], te.config.hidden_size).to(memory_format=torch.channels_last)
    if cfg.unet.init:
        from sfumato.stages import load_unet_weights

        load_unet_weights(unet, cfg.unet.init)
    holdout = c["holdout"].numpy()
    train_idx, val_idx = np.flatnonzero(~holdout), np.flatnonzero(holdout)
    trains_text = cfg.unet.text_encoder_lr > 0
    # what trains: the UNet, or the UNet with the text tower in front, reading token ids (one EMA over both)
    trained = PromptUNet(unet, te.requires_grad_(True).train()) if trains_text else unet
    text = (c["ids"], c["rows"], c["empty_ids"]) if trains_text else (c["states"], c["rows"], c["empty"])
    grounding = (c["ground_assign"], c["ground_boxes"], 64) if "ground_assign" in c else None
    negatives = None
    if cfg.unet.relation_contrast > 0:  # the captions back from their ids (they round-trip exactly)
        from sfumato.diffusion import relation_negatives

        unique = tok.batch_decode(c["ids"], skip_special_tokens=True)
        text, negatives = relation_negatives(tok, [unique[r] for r in c["rows"].tolist()], text,
                                             None if trains_text else te)
    batches = LatentBatches(cfg, scheduler, (c["mean"], c["std"]), text, meta["scaling"], grounding, negatives)
    weights = None
    if cfg.data.shapes_mix:
        # The cache holds the standard mix, where pair i is of category CATEGORIES[i % 9]; drawing
        # each pair with its category's share gives the mix's proportions without a new cache.
        from sfumato.shapesworld.spec import CATEGORIES, mix_categories

        share = [mix_categories(cfg.data.shapes_mix).count(cat) for cat in CATEGORIES]
        weights = torch.tensor([float(share[i % len(CATEGORIES)]) for i in train_idx])
    ema = make_ema(trained, cfg.unet)
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if trains_text:
        groups.append({"params": list(te.parameters()), "scale": cfg.unet.text_encoder_lr / cfg.unet.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.unet.lr, betas=(0.9, 0.99), weight_decay=0.0)  # as the engine
    budget = args.minutes * 60
    metrics = open(work / "logs" / "metrics.jsonl", "w")
    params = sum(p.numel() for p in trained.parameters())
    log(f"{name}: {params / 1e6:.2f} M parameters, {args.minutes} min, {args.threads} thread(s), overrides {ARMS[args.arm] + list(args.set or [])}")

    # Arms with the same UNet and batch share one figure: the mean of their probes.
    probes = {k: v for f in root.glob("probe-*.json") for k, v in json.loads(f.read_text()).items()}
    same = [v for k, v in probes.items() if k.endswith(f"/{args.threads}") and k.split("/")[0] in ARMS
            and _shape(k.split("/")[0]) == _shape(args.arm, args.set)]
    if not same and not args.steps:
        raise SystemExit(f"no probe for {args.arm} with {args.threads} thread(s): run `probe --arms {args.arm}` first")
    probed = round(sum(same) / len(same), 1) if same else None
    total = args.steps or int(budget * probed / cfg.unet.batch_size)
    step, t0 = 0, time.perf_counter()
    unet.train()
    while step < total:
        for gr in opt.param_groups:
            gr["lr"] = get_lr(step, total, cfg.unet.lr, cfg.unet.warmup) * gr["scale"]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss, logs = unet_loss(trained, batches, train_idx, g, "cpu", weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(trained.parameters())
        step += 1
        if args.snapshots and step < total and step % max(1, total // args.snapshots) == 0:
            minutes = round(args.minutes * step / total, 1)
            snap = ema_copy(trained, ema)
            (snap.unet if trains_text else snap).to(memory_format=torch.contiguous_format).save_pretrained(
                work / f"snapshots/{minutes:06.1f}min-ema")
            if trains_text:
                snap.text_encoder.save_pretrained(work / f"snapshots/{minutes:06.1f}min-text_encoder")
            del snap
        if step % 50 == 0:
            metrics.write(json.dumps({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                                      "loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}) + "\n")
            metrics.flush()
    train_s = time.perf_counter() - t0
    samples_s = step * cfg.unet.batch_size / train_s
    log(f"{name}: {step} steps in {train_s:.0f} s, {samples_s:.1f} samples/s")

    result = {"arm": args.arm, "seed": args.seed, "tag": args.tag, "overrides": ARMS[args.arm] + list(args.set or []),
              "minutes": args.minutes, "threads": args.threads, "steps": step, "samples_per_s": probed,
              "samples_per_s_this_run": round(samples_s, 1), "train_seconds": round(train_s),
              "params_m": round(params / 1e6, 2), "text_encoder_trained": trains_text, "config": to_dict(cfg)}
    weights = {"ema": ema_copy(trained, ema), "raw": trained}
    sampler = build_sample_scheduler(scheduler)
    for kind, both in weights.items():
        both.eval()
        model, tower = (both.unet, both.text_encoder) if trains_text else (both, te)
        model.to(memory_format=torch.contiguous_format)
        save_model(base, model, sampler, work / f"model-{kind}", tower if trains_text else None)
        with torch.no_grad():
            result[kind] = {**counterfactual_sensitivity(model, scheduler, vae, tok, tower),
                            **band_metrics(both, SimpleNamespace(val_idx=val_idx), batches, "cpu")}
        log(f"{name} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[kind].items()))
    for kind in (["ema", "raw"] if args.eval_raw else ["ema"]):
        pipe = load(work / f"model-{kind}")
        # the UNet alone: layout search would hide what the recipe does to position
        res = evaluate_compositional(pipe, work / f"eval-{kind}", per_category=args.per_category, progress=False,
                                     layout_search=0)
        result[kind]["compositional"] = res["overall"]
        result[kind]["per_category"] = res["per_category"]
        result[kind]["eval_seconds_per_image"] = res["seconds_per_image"]
        log(f"{name} {kind}: compositional {res['overall']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in res["per_category"].items()))
    (work / "result.json").write_text(json.dumps(result, indent=1))


def base_copy(base: Path, folder: Path) -> Path:
    """The base model's folder without its UNet, sampler and card: tokenizer, text tower, VAE, CLIP. Its
    few-step UNet and ONNX graphs stay behind too: they belong to the base's UNet, and an arm is
    evaluated with the full sampler it was trained for."""
    from sfumato.pipeline import FAST_UNET

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("unet", "scheduler", "sfumato.json", FAST_UNET, "onnx"))
    return folder


def save_model(base: Path, unet, sampler, folder: Path, text_encoder=None) -> Path:
    """A complete diffusers folder: the base model's tokenizer, text tower and VAE with this UNet (and
    this text tower, when the arm trained one)."""
    base_copy(base, folder)
    unet.save_pretrained(folder / "unet")
    sampler.save_pretrained(folder / "scheduler")
    if text_encoder is not None:
        shutil.rmtree(folder / "text_encoder")
        text_encoder.save_pretrained(folder / "text_encoder")
        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder"] = ["transformers", type(text_encoder).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def eval_snapshots(args) -> None:
    """Compositional pass rates of each snapshot of an arm (for the curve against training minutes)."""
    from sfumato.evaluate import evaluate_compositional
    from sfumato.models import quiet_libraries
    from sfumato.pipeline import load

    torch.set_num_threads(args.threads)
    quiet_libraries()
    work = Path(args.out) / args.run
    base = Path(json.loads((Path(args.out) / "cache.json").read_text())["base"])
    sched_dir = next(work.glob("model-*/scheduler"), None) or base / "scheduler"
    for snap in sorted((work / "snapshots").glob("*min-ema")):
        res_path = snap / "result.json"
        if res_path.exists() or (args.only and snap.name not in args.only.split(",")):
            continue
        folder = base_copy(base, work / "snapshot-model")
        shutil.copytree(snap, folder / "unet", ignore=shutil.ignore_patterns("result.json", "eval"))
        tower = snap.parent / snap.name.replace("-ema", "-text_encoder")
        if tower.exists():
            shutil.rmtree(folder / "text_encoder")
            shutil.copytree(tower, folder / "text_encoder")
        shutil.copytree(sched_dir, folder / "scheduler")
        res = evaluate_compositional(load(folder), snap / "eval", per_category=args.per_category, progress=False,
                                     layout_search=0)
        res_path.write_text(json.dumps({"minutes": float(snap.name.split("min")[0]), **res}, indent=1))
        log(f"{args.run} {snap.name}: compositional {res['overall']:.3f}")


def plot_curves(rows: list[dict], path: Path) -> None:
    """Pass rate per category against training minutes, one panel per run (drawn with PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    cats = ("single_object", "colors", "size", "background", "two_objects", "counting", "position",
            "attribute_binding", "text", "overall")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (0, 0, 0)]
    w, h, pad = 520, 300, 40
    img = Image.new("RGB", (w * len(rows) + 200, h + 2 * pad), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, run in enumerate(rows):
        x0, x1, y0, y1 = i * w + pad, (i + 1) * w - 10, pad, pad + h
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, 8), f"{run['name']}: pass rate vs training minutes", fill=(0, 0, 0), font=font)
        pts = run["points"]  # [(minutes, {category: rate, "overall": rate})]
        tmax = max(m for m, _ in pts) or 1
        for frac in (0, 0.25, 0.5, 0.75, 1):
            y = y1 - frac * h
            d.line([x0, y, x0 + 4, y], fill=(0, 0, 0))
            d.text((x0 - 28, y - 5), f"{frac:.2f}", fill=(0, 0, 0), font=font)
        for m, _ in pts:
            x = x0 + m / tmax * (x1 - x0)
            d.text((x - 8, y1 + 4), f"{m:g}", fill=(0, 0, 0), font=font)
        for c, colour in zip(cats, palette):
            xy = [(x0 + m / tmax * (x1 - x0), y1 - r.get(c, 0) * h) for m, r in pts if c in r]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=3 if c == "overall" else 1)
            for x, y in xy:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    lx = w * len(rows) + 10
    for j, (c, colour) in enumerate(zip(cats, palette)):
        d.line([lx, pad + 14 * j + 6, lx + 20, pad + 14 * j + 6], fill=colour, width=3)
        d.text((lx + 26, pad + 14 * j), c, fill=(0, 0, 0), font=font)
    img.save(path)


def ship(args) -> None:
    """Put a run's EMA UNet (and sampler) into a model folder, e.g. the shipped default model, and
    record its recipe, measurements and training time in that folder's sfumato.json."""
    from sfumato.files import publish_dir

    run = Path(args.out) / args.run
    result = json.loads((run / "result.json").read_text())
    target = Path(args.into)
    card = json.loads((target / "sfumato.json").read_text())
    parts = ["unet"] + (["text_encoder"] if result.get("text_encoder_trained") else [])  # a trained tower ships too
    for part in parts:
        tmp = target / f".{part}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run / "model-ema" / part, tmp)
        publish_dir(tmp, target / part)
    shutil.copytree(run / "model-ema" / "scheduler", target / "scheduler", dirs_exist_ok=True)
    if "text_encoder" in parts:  # the tower's class may have changed (unet.text_bidirectional)
        index = json.loads((target / "model_index.json").read_text())
        index["text_encoder"] = json.loads((run / "model-ema" / "model_index.json").read_text())["text_encoder"]
        (target / "model_index.json").write_text(json.dumps(index, indent=1))
    history = card.setdefault("unet_history", [{"config": card["config"]["unet"], "seconds": card["seconds"]["unet"]}])
    history.append({"config": result["config"]["unet"], "seconds": result["train_seconds"], "steps": result["steps"],
                    "threads": result["threads"], "run": args.run})
    card["config"]["unet"] = result["config"]["unet"]
    card["seconds"]["unet"] = round(sum(h["seconds"] for h in history), 1)
    card["metrics"]["unet"] = {k: v for k, v in result["ema"].items() if isinstance(v, (int, float))}
    card["metrics"]["compositional"] = {"overall": result["ema"].get("compositional"),
                                        **result["ema"].get("per_category", {})}
    (target / "sfumato.json").write_text(json.dumps(card, indent=1))
    log(f"shipped {args.run} into {target}")


def report(args) -> None:
    """A markdown table of every finished arm (mean and spread over seeds)."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/result.json"))]
    cats = ("single_object", "colors", "size", "background", "two_objects", "counting", "position",
            "attribute_binding", "text")
    short = ("single", "colors", "size", "bg", "two", "count", "pos", "bind", "text")
    head = ("| arm | seed | min | samples/s | steps | overall (EMA) | " + " | ".join(short)
            + " | cf relation | cf binding | cf shape | cf count | cf digit | cf colour | x0 mid | x0 high | overall raw |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = r["ema"]
        pc = e.get("per_category", {})
        raw = r.get("raw", {}).get("compositional")
        lines.append(
            f"| {r['arm']}{'-' + r['tag'] if r.get('tag') else ''} | {r['seed']} | {r['minutes']} | {r['samples_per_s']} | {r['steps']} | "
            f"{e.get('compositional', float('nan')):.3f} | " + " | ".join(f"{pc.get(c, float('nan')):.2f}" for c in cats)
            + " | " + " | ".join(f"{100 * e.get(f'cf_{k}_t700', float('nan')):+.1f}%"
                                 for k in ("relation", "binding", "shape", "count", "digit", "color"))
            + f" | {e.get('x0_mse_mid_cond', float('nan')):.3f} | {e.get('x0_mse_high_cond', float('nan')):.3f}"
            + f" | {'' if raw is None else f'{raw:.3f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    curves = []
    for run in sorted(Path(args.out).glob("*/snapshots")):
        pts = []
        for f in sorted(run.glob("*/result.json")):
            r = json.loads(f.read_text())
            pts.append((r["minutes"], {**r["per_category"], "overall": r["overall"]}))
        final = json.loads((run.parent / "result.json").read_text()) if (run.parent / "result.json").exists() else None
        if final and "per_category" in final["ema"]:
            pts.append((final["minutes"], {**final["ema"]["per_category"], "overall": final["ema"]["compositional"]}))
        if len(pts) > 1:
            curves.append({"name": run.parent.name, "points": pts})
    if curves and args.plot:
        plot_curves(curves, Path(args.plot))
        print(f"wrote {args.plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "probe", "arm", "snapshots", "report", "ship"))
    p.add_argument("arm", nargs="?", choices=tuple(ARMS))
    p.add_argument("--out", default="runs/study")
    p.add_argument("--base", default=str(Path(__file__).resolve().parents[1] / "src/sfumato/assets/default-model"))
    p.add_argument("--pairs", type=int, default=30_000)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--steps", type=int, default=0,
                   help="train exactly this many steps instead (equal steps with a run of the same probed speed)")
    p.add_argument("--tower", default="", help="arm: a text_encoder/ folder to start the tower from (default: the base's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", help="extra section.key=value overrides for this arm")
    p.add_argument("--tag", default="", help="suffix of the arm's folder (for --set variants)")
    p.add_argument("--per-category", type=int, default=20)
    p.add_argument("--eval-raw", action="store_true", help="also sample the raw (non-EMA) weights")
    p.add_argument("--md", default="")
    p.add_argument("--plot", default="", help="report: PNG of pass rate per category against training minutes")
    p.add_argument("--snapshots", type=int, default=0, help="arm: save this many EMA snapshots along the way")
    p.add_argument("--run", default="", help="snapshots, ship: the arm folder (e.g. combined-s0-warm)")
    p.add_argument("--only", default="", help="snapshots: comma-separated snapshot names to evaluate")
    p.add_argument("--into", default="", help="ship: the model folder that gets the run's UNet")
    p.add_argument("--arms", default=",".join(ARMS), help="probe: comma-separated arm names")
    args = p.parse_args()
    if args.command == "arm" and not args.arm:
        p.error("arm needs an arm name")
    {"prepare": prepare, "probe": probe, "arm": run_arm, "snapshots": eval_snapshots, "report": report,
     "ship": ship}[args.command](args)


if __name__ == "__main__":
    main()
