"""The four training stages. Each takes the Run, trains, saves its component(s) into the work folder
and returns its held-out metrics."""

from __future__ import annotations

import random
import re
import warnings

import numpy as np
import torch

from .clip import ClipTrainer, batch_negatives, embed_images, embed_texts, hard_negative_accuracy, retrieval_metrics
from .data import to_model_range
from .engine import StageSpec
from .errors import UsageError
from .models import (bidirectional_text_encoder, build_clip, build_sample_scheduler, build_train_scheduler,
                     build_unet, build_vae, load_text_encoder, text_encoder_from_clip, vae_factor)
from .tokenizer import encode, load_tokenizer, train_tokenizer

EVAL_PAIRS = 1000
# The sample grids drawn during UNet training: the model's default sampler, 20 steps, guidance 4.
SAMPLE_SETTINGS = {"steps": 20, "guidance": 4.0, "scheduler": "DPM++ 2M"}


def run_tokenizer(run) -> dict:
    cfg, data, engine = run.cfg, run.data, run.engine
    if engine.is_main:
        tok = train_tokenizer((data.captions[i] for i in data.train_idx), cfg.tokenizer.vocab_size,
                              cfg.tokenizer.context_length, run.work / "tokenizer")
    engine.barrier()
    tok = load_tokenizer(run.work / "tokenizer")
    _, cut = encode(tok, data.captions)
    if cut:
        warnings.warn(f"{cut} of {len(data.captions)} captions are longer than the context of "
                      f"{tok.model_max_length} tokens and were cut; raise tokenizer.context_length to keep them")
    return {"vocab_size": len(tok), "captions_truncated": cut}


def run_clip(run) -> dict:
    cfg, data, engine = run.cfg, run.data, run.engine
    tok = load_tokenizer(run.work / "tokenizer")
    ids, _ = encode(tok, data.captions)
    clip = build_clip(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).to(engine.device)
    metrics = engine.run(clip_stage(cfg, data, tok, ids, clip, engine.device))
    if engine.is_main:
        save_clip(clip, tok, cfg.data.res, run.work / "clip")
        text_encoder_from_clip(clip).save_pretrained(run.work / "text_encoder")
    return metrics


def clip_stage(cfg, data, tok, ids, clip, device) -> StageSpec:
    """The CLIP stage for Engine.run: batches of cfg.clip.batch_size training pairs (token ids `ids`,
    one row per caption of `data`), hard negatives per cfg.clip, held-out metrics as eval."""
    c = cfg.clip
    trainer = ClipTrainer(clip)
    train_idx = data.train_idx
    val = data.val_idx[:EVAL_PAIRS]

    def loss_fn(model, g):
        idx = train_idx[torch.randperm(len(train_idx), generator=g)[: c.batch_size].numpy()]
        x = to_model_range(data.images[idx]).to(device)
        neg = None
        if c.hard_negatives:
            rng = random.Random(int(torch.randint(2**31, (1,), generator=g)))
            negs = batch_negatives([data.captions[i] for i in idx], rng, c.negatives, c.negative_kinds)
            neg = encode(tok, negs)[0].to(device) if negs else None
        loss = model(x, ids[idx].to(device), neg)
        return loss, {"logit_scale": clip.logit_scale.exp().detach()}

    def eval_fn(step):
        return clip_metrics(clip, tok, data, val, ids)

    return StageSpec("clip", trainer, loss_fn, c.steps, c.lr, c.warmup, c.batch_size,
                     weight_decay=c.weight_decay, eval_fn=eval_fn if len(val) else None)


def save_clip(clip, tok, res: int, folder) -> None:
    """MODEL/clip: the CLIPModel, its tokenizer and the image processor of training (res px, [-1, 1])."""
    from transformers import CLIPImageProcessor

    clip.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": res}, crop_size={"height": res, "width": res},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def clip_metrics(clip, tok, data, val, ids) -> dict:
    if len(val) == 0:
        return {}
    x = to_model_range(data.images[val]).to(clip.device)
    img = embed_images(clip, x)
    txt = embed_texts(clip, ids[val].to(clip.device))
    caps = [data.captions[i] for i in val]
    out = retrieval_metrics(img.cpu(), txt.cpu(), caps)
    out.update(hard_negative_accuracy(clip, tok, x, caps))
    clip.train()
    return out


def run_vae(run) -> dict:
    from .vae import fit_scaling_factor, vae_metrics, vae_stage

    cfg, data, engine = run.cfg, run.data, run.engine
    vae = build_vae(cfg).to(engine.device)
    metrics = engine.run(vae_stage(cfg, data, vae, engine))
    if engine.is_main:
        vae.register_to_config(scaling_factor=fit_scaling_factor(vae, data))
        vae.save_pretrained(run.work / "vae")
        if not metrics or "vae_psnr" not in metrics:
            metrics.update(vae_metrics(vae, data))
        metrics["scaling_factor"] = vae.config.scaling_factor
    return metrics


# Parts a run may add to a saved UNet it starts from: the prompt in the time embedding, attention
# layers at a level that had none (down_blocks.i.attentions / up_blocks.i.attentions), and more
# transformer blocks in an attention layer (….transformer_blocks.k, k ≥ 1).
GROWABLE = re.compile(r"add_embedding\.|(down|up)_blocks\.\d+\.attentions\.|"
                      r"mid_block\.attentions\.\d+\.transformer_blocks\.[1-9]")
# The output layers of a transformer block, each at the end of a residual branch.
BLOCK_OUTPUTS = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")


def load_unet_weights(unet, folder) -> None:
    """Start from the weights of a saved UNet of the same architecture (unet.init).

    A saved UNet may also seed a grown one: with the prompt-in-time-embedding path, attention at a
    level that had none, or more transformer blocks per attention layer. Each new part starts with a
    zero output (the embedding's last LayerNorm, the attention's output projection, a new block's
    attention and feed-forward outputs; all sit on a residual path), so the grown
    UNet computes exactly what the saved one did and training takes it from there.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise UsageError(f"unet.init: {path} does not exist (give a diffusers unet/ folder with safetensors weights)")
    weights = load_file(str(path))
    own = unet.state_dict()
    if unet.config.center_input_sample and weights["conv_in.weight"].shape != own["conv_in.weight"].shape:
        from diffusers import UNet2DConditionModel

        saved = UNet2DConditionModel.load_config(folder)
        weights["conv_in.weight"], weights["conv_in.bias"] = _widen_conv_in(
            weights["conv_in.weight"], weights["conv_in.bias"], own["conv_in.weight"].shape[-1],
            saved.get("center_input_sample", False))
    new = [k for k in own if k not in weights and GROWABLE.match(k)]
    wrong = [k for k in own if k not in new and (k not in weights or weights[k].shape != own[k].shape)]
    if wrong or len(weights) != len(own) - len(new):
        raise UsageError(f"unet.init: {folder} has another architecture than unet.* of this run "
                         f"(first difference: {(wrong or sorted(set(weights) - set(own)))[0]})")
    unet.load_state_dict(weights, strict=not new)
    grown = set()  # names of the output layers to zero
    for k in new:
        layer, _, rest = k.partition(".transformer_blocks.")
        if ".proj_out." in k:  # a whole new attention layer: its output projection
            grown.add(k.split(".proj_out.")[0] + ".proj_out")
        elif rest and f"{layer}.proj_out.weight" in weights:  # a new block in a layer that was there
            grown |= {f"{layer}.transformer_blocks.{rest.split('.')[0]}.{out}" for out in BLOCK_OUTPUTS}
    for name in grown:
        module = unet.get_submodule(name)
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)
    if any(k.startswith("add_embedding.") for k in new):
        torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
        torch.nn.init.zeros_(unet.add_embedding.norm2.bias)


def with_position_input(unet):
    """The same UNet with the position input (`unet.position_input`): conv_in widened to the position
    kernel over the centred input, its old taps in the middle and the outer ones seeded as ramps
    (`_widen_conv_in`). Plain diffusers loads the result (two config keys). A UNet that has it already
    is returned as it is."""
    from diffusers import UNet2DConditionModel

    from .models import position_kernel

    kernel = position_kernel(unet.config.sample_size)
    if unet.config.center_input_sample and unet.config.conv_in_kernel == kernel:
        return unet
    grown = UNet2DConditionModel.from_config({**unet.config, "center_input_sample": True, "conv_in_kernel": kernel})
    weights = unet.state_dict()
    weights["conv_in.weight"], weights["conv_in.bias"] = _widen_conv_in(
        weights["conv_in.weight"], weights["conv_in.bias"], kernel, unet.config.center_input_sample)
    grown.load_state_dict(weights)
    return grown.to(unet.dtype)


def _widen_conv_in(w: torch.Tensor, b: torch.Tensor, kernel: int, centred: bool):
    """A saved conv_in in the middle of a wider kernel that reads the centred input 2x - 1: halved,
    with the bias taking back the shift, it computes what it did everywhere but at the border cells.

    The new outer taps start as two faint ramps, +1 on the taps left of the middle and -1 right of
    it (and the same by rows), mixed into every channel with random weights (standard deviation
    0.25 / (kernel // 2)^2): over the padded shift they give each cell a constant that grows with its
    column (row). Zero outer taps learnt no position in 2,067 steps (docs/recipe.md, round 9): a
    query that does not vary with position gives a key nothing to learn from, and the reverse."""
    if kernel < w.shape[-1] or (kernel - w.shape[-1]) % 2:
        raise UsageError(f"unet.init: conv_in kernel {w.shape[-1]} does not fit in the middle of {kernel}")
    if not centred:
        w, b = w / 2, b + w.sum(dim=(1, 2, 3)) / 2
    pad = (kernel - w.shape[-1]) // 2
    wide = torch.nn.functional.pad(w, (pad, pad, pad, pad))
    off = torch.arange(kernel) - kernel // 2
    cols = -torch.sign(off).float()[None, :].expand(kernel, kernel)
    outer = ~((off.abs() <= w.shape[-1] // 2)[:, None] & (off.abs() <= w.shape[-1] // 2)[None, :])
    coef = torch.randn(w.shape[0], 2, generator=torch.Generator().manual_seed(0)) * (0.25 / (kernel // 2) ** 2)
    ramps = coef[:, 0, None, None] * cols + coef[:, 1, None, None] * cols.T
    return wide + (ramps * outer)[:, None] / w.shape[1], b


def grid_prompts(cfg, data) -> list[str]:
    """The prompts of the UNet's sample grids: the configured ones; on a user's own data, where the
    configured ones are still the ShapesWorld defaults, the first distinct held-out captions."""
    from .config import TrainCfg

    if data.source == "shapesworld" or tuple(cfg.sample_prompts) != TrainCfg().sample_prompts:
        return list(cfg.sample_prompts)
    held_out = list(dict.fromkeys(data.captions[i] for i in data.val_idx))[:len(cfg.sample_prompts)]
    return held_out or list(cfg.sample_prompts)


def draw_samples(pipe, prompts: list[str], seed: int) -> list:
    """One image per prompt, in one batch through Pipeline.generate (SAMPLE_SETTINGS); the i-th uses seed + i."""
    from .config import GenerationSettings

    return pipe.generate(GenerationSettings(prompts[0], seed=seed, **SAMPLE_SETTINGS), prompts=prompts)


def run_unet(run) -> dict:
    from diffusers import AutoencoderKL

    from .diffusion import LatentBatches, PromptUNet, cache_latents, cache_text, caption_ids, ema_copy, unet_stage
    from .pipeline import Pipeline
    from .vae import checker_pass_rate
    from .viz import make_grid

    cfg, data, engine = run.cfg, run.data, run.engine
    dev = engine.device
    tok = load_tokenizer(run.work / "tokenizer")
    trains_text = cfg.unet.text_encoder_lr > 0
    text_encoder = load_text_encoder(run.work / "text_encoder")
    if cfg.unet.text_bidirectional:
        text_encoder = bidirectional_text_encoder(text_encoder)
    text_encoder = text_encoder.to(dev).eval().requires_grad_(trains_text)
    vae = AutoencoderKL.from_pretrained(run.work / "vae").to(dev).eval().requires_grad_(False)
    latents = cache_latents(vae, data.images, progress=engine.progress)
    # A frozen tower's states are cached once; a tower that trains along reads token ids every batch.
    text = caption_ids(tok, data.captions) if trains_text else cache_text(tok, text_encoder, data.captions)
    scheduler = build_train_scheduler(cfg)
    sampler = build_sample_scheduler(scheduler)
    sampler_config = {k: v for k, v in sampler.config.items() if not k.startswith("_")}
    latent_res = cfg.data.res // vae_factor(vae)
    # Channels-last convolutions: 1.27x UNet training samples/s on a CPU (benchmarks/bench_train.py).
    unet = build_unet(cfg, latent_res, text_encoder.config.hidden_size).to(dev, memory_format=torch.channels_last)
    if cfg.unet.init:
        load_unet_weights(unet, cfg.unet.init)
    grounding = None
    if cfg.unet.grounding_weight > 0 and data.records is not None:
        from .token_grounding import grounding_targets

        grounding = grounding_targets(tok, data.captions, data.records, tok.model_max_length)
    negatives = None
    if cfg.unet.relation_contrast > 0:
        from .diffusion import relation_negatives

        text, negatives = relation_negatives(tok, data.captions, text, None if trains_text else text_encoder)
    batches = LatentBatches(cfg, scheduler, latents, text, vae.config.scaling_factor, grounding, negatives)
    model = PromptUNet(unet, text_encoder) if trains_text else unet
    prompts = grid_prompts(cfg, data)

    def parts(m):
        return (m.unet, m.text_encoder) if trains_text else (m, text_encoder)

    def sample_fn(step):
        weights = {"ema": ema_copy(model, spec.ema), "raw": model}
        out = {}
        for name, both in weights.items():
            both.eval()
            denoiser, tower = parts(both)
            pipe = Pipeline(None, tok, tower, vae, denoiser, sampler_config, dev)
            pil = draw_samples(pipe, prompts * 2, seed=step)
            imgs = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2)
            rate = checker_pass_rate(imgs, prompts * 2) if data.source == "shapesworld" else None
            if rate is not None:
                out[f"samples_checker_pass_{name}"] = rate
            make_grid(pil, prompts * 2, cols=len(prompts)).save(
                run.work / "logs" / f"samples-{step:06d}-{name}.png")
        model.train()
        return out

    spec = unet_stage(cfg, data, model, scheduler, batches, engine, sample_fn)
    metrics = engine.run(spec)
    if engine.is_main:
        final_unet, final_text = parts(ema_copy(model, spec.ema) if cfg.unet.ema_decay > 0 else model)
        final_unet.to(memory_format=torch.contiguous_format).save_pretrained(run.work / "unet")
        if trains_text:  # the tower learnt with this UNet; clip/ keeps its own
            final_text.save_pretrained(run.work / "text_encoder")
        sampler.save_pretrained(run.work / "scheduler")
    return metrics
