"""Typed training configuration: presets, JSON files and `--set section.key=value` overrides.

    cfg = get_preset("small"); apply_overrides(cfg, ["unet.lr=2e-4", "unet.steps=20000"])
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError


@dataclass
class DataCfg:
    res: int = 64  # training resolution; other sizes are fitted by `resize`
    resize: str = "center-crop"  # center-crop | squash | pad
    holdout: float = 0.05  # fraction of pairs held out for validation (by a hash of their id)
    max_pixels: int = 4096 * 4096
    shapes_n: int = 30_000  # pairs when --data is "shapesworld"
    shapes_seed: int = 0
    shapes_mix: str = ""  # category shares, e.g. "position=2,counting=2" (others keep 1)


@dataclass
class TokenizerCfg:
    vocab_size: int = 1024
    context_length: int = 77


@dataclass
class ClipCfg:
    embed_dim: int = 128
    vision_width: int = 128
    vision_layers: int = 3
    patch_size: int = 8
    text_width: int = 128
    text_layers: int = 3
    heads: int = 4
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.1
    hard_negatives: bool = True  # caption edits (swapped colours / relation, changed count / digit)
    negatives: int = 1  # hard negatives per caption (distinct edits, where that many apply)
    negative_kinds: tuple[str, ...] = ("swap_colors", "swap_relation", "count", "digit", "color")  # and "shape"


@dataclass
class VaeCfg:
    channels: tuple[int, ...] = (32, 64, 64)  # len - 1 down-samplings: (a, b, c) -> factor 4
    latent_channels: int = 4
    layers_per_block: int = 1
    # GroupNorm groups (0: the most that divide every width). One channel per group normalises away
    # each feature map's mean, i.e. the flat colours ShapesWorld is made of.
    norm_groups: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    l1_weight: float = 1.0  # L1 keeps flat colours and hard edges crisper than MSE alone
    mse_weight: float = 1.0
    crop: int = 0  # train on random crops of this size (0: whole images); the VAE is convolutional


@dataclass
class UnetCfg:
    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)  # cross-attention at these resolutions
    head_dim: int = 32
    # Transformer blocks (self-, cross-attention, feed-forward) per attention layer: a second one lets
    # each object's region read the prompt again after the first has told the objects apart.
    transformer_layers: int = 1
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 200
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # epsilon | v_prediction
    zero_terminal_snr: bool = True  # https://arxiv.org/abs/2305.08891
    snr_gamma: float = 5.0  # min-SNR-gamma weighting, 0 disables; https://arxiv.org/abs/2303.09556
    # Which noise levels training draws: uniform, or logit_normal over t/T (SD3's sampler; logit_mean > 0
    # spends more steps at high noise, where layout, counts and positions are decided).
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # This share of each batch draws its noise levels uniformly instead, so the low-noise steps where a
    # sampler finishes edges and digit strokes still train when the sampler above leans to high noise.
    uniform_share: float = 0.0
    # The pooled prompt also enters the time embedding (diffusers addition_embed_type="text"), so every
    # ResNet block is modulated by the prompt, not only the attention levels.
    text_time_embedding: bool = False
    caption_dropout: float = 0.1  # empty prompt this often, so classifier-free guidance works
    # > 0 trains the text tower (text_encoder/) with the UNet at this learning rate, so the prompt's
    # token states can change to suit the UNet (which object is which); 0 keeps it frozen and its
    # states cached. clip/ and search are untouched either way.
    text_encoder_lr: float = 0.0
    # > 0 adds the token-grounding loss at this weight where the data says where each object is
    # (ShapesWorld): each object word's cross-attention is kept inside its object (token_grounding.py).
    grounding_weight: float = 0.0
    # The grounding loss only on steps noised to t >= this: below it the latent already shows where
    # each object is and the loss is met by reading it; above it only the prompt can say where.
    grounding_min_t: int = 0
    # > 0 adds a relation-contrast loss at this weight where captions name a relation (ShapesWorld's
    # grammar): each such pair noised to t >= contrast_min_t is denoised again under a caption with
    # another relation, whose error must exceed the true caption's by contrast_margin (a share).
    relation_contrast: float = 0.0
    contrast_margin: float = 0.05
    contrast_min_t: int = 500
    # Centre the UNet's input (2x - 1) and widen conv_in to the whole latent (kernel latent_res + 1):
    # conv_in's zero padding of the shifted input then gives every cell a constant of its own, so
    # the attention layers can tell where they are, which "to the left of" needs (diffusers' own
    # center_input_sample and conv_in_kernel keys: a plain UNet2DConditionModel still loads it).
    position_input: bool = False
    # Lift the text tower's causal mask (models.bidirectional_text_encoder), so the first-named object's
    # tokens read the relation that follows them; needs text_encoder_lr > 0 to adapt the tower. Every
    # word's state then carries the whole prompt, so per-word attention stops pointing at its object
    # (pointing game 0.805 -> 0.177) and neither explain nor layout search can read it (recipe.md, round 11).
    text_bidirectional: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True
    init: str = ""  # a diffusers unet/ folder to start from (train longer, fine-tune); same architecture


@dataclass
class TrainCfg:
    data: DataCfg = field(default_factory=DataCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    vae: VaeCfg = field(default_factory=VaeCfg)
    unet: UnetCfg = field(default_factory=UnetCfg)
    preset: str = "small"
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    checkpoint_every: int = 500  # steps
    eval_every: int = 1000  # steps; validation metrics and a sample grid
    log_every: int = 25
    sample_prompts: tuple[str, ...] = (
        "a red circle",
        "a big blue square on a white background",
        "a yellow triangle to the left of a green cross",
        "three purple circles",
        "a orange circle and a blue triangle",
        "the digit 7 in red",
    )


PRESETS: dict[str, dict] = {
    # End to end in well under two minutes on two CPU cores; for tests and smoke runs.
    "tiny": {
        "data.res": 32, "data.shapes_n": 600, "tokenizer.vocab_size": 512, "tokenizer.context_length": 24,
        "clip.embed_dim": 32, "clip.vision_width": 32, "clip.text_width": 32, "clip.vision_layers": 1,
        "clip.text_layers": 1, "clip.heads": 2, "clip.patch_size": 8, "clip.steps": 60, "clip.batch_size": 32,
        "clip.warmup": 5, "clip.lr": 2e-3,
        "vae.channels": (16, 32), "vae.latent_channels": 4, "vae.steps": 60, "vae.batch_size": 16, "vae.warmup": 5,
        "unet.channels": (32, 32), "unet.attention_levels": (False, True), "unet.head_dim": 16, "unet.steps": 60,
        "unet.batch_size": 16, "unet.warmup": 5, "unet.lr": 1e-3, "unet.ema_decay": 0.99,
        "checkpoint_every": 20, "eval_every": 60, "log_every": 5,
    },
    # The shipped default model's recipe, sized for a 2-core CPU (about two hours with one thread
    # on a Xeon without AMX; see the README's model card for the measured stage times).
    "small": {
        "tokenizer.context_length": 32, "clip.steps": 800, "vae.steps": 2500, "vae.crop": 32,
        # The UNet recipe the study chose (docs/recipe.md): plain v-MSE with timesteps drawn towards
        # high noise with half of each batch drawn uniformly, the prompt also in the time embedding,
        # lr 1e-3, the text tower trained along at the same rate; 37,900 steps of 64 is what the shipped
        # UNet was trained for in all (37,885 in nine runs, the first two with older recipes, the tower
        # trained along in the last two, the uniform half in the last).
        "unet.channels": (32, 64, 64), "unet.steps": 37_900, "unet.lr": 1e-3, "unet.warmup": 200,
        "unet.text_encoder_lr": 1e-3, "unet.uniform_share": 0.5,
        "unet.snr_gamma": 0.0, "unet.timestep_sampling": "logit_normal", "unet.logit_mean": 0.5,
        "unet.text_time_embedding": True,
        "checkpoint_every": 200, "eval_every": 400,
    },
    # For a GPU: bigger towers, more steps, bf16.
    "base": {
        "clip.embed_dim": 256, "clip.vision_width": 256, "clip.text_width": 256, "clip.vision_layers": 6,
        "clip.text_layers": 6, "clip.heads": 8, "clip.steps": 20_000, "clip.batch_size": 512,
        "vae.channels": (64, 128, 128), "vae.steps": 20_000,
        "unet.channels": (128, 256, 256), "unet.layers_per_block": 2, "unet.steps": 100_000,
        "unet.batch_size": 256, "unet.ema_decay": 0.9999, "mixed_precision": "bf16",
    },
}


def get_preset(name: str) -> TrainCfg:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = TrainCfg(preset=name)
    _apply(cfg, PRESETS[name].items())
    return cfg


def _resolve(cfg, key: str):
    """(object holding the field, field) for a dotted key, or a UsageError naming it."""
    obj, *path, name = [cfg, *key.split(".")]
    for part in path:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise UsageError(f"unknown config key {key!r}")
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if name not in fields or dataclasses.is_dataclass(getattr(obj, name)):
        known = ", ".join(sorted(fields)) if fields else "data, tokenizer, clip, vae, unet, ..."
        raise UsageError(f"unknown config key {key!r} (known here: {known})")
    return obj, fields[name]


def _coerce(key: str, value, hints):
    """Check a value against a field's (resolved) type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hints)
    if origin is tuple:
        (item, *_) = typing.get_args(hints)
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{key} must be a tuple, got {value!r}")
        return tuple(_coerce(key, v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hints is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hints in (int, float, str, bool) and (type(value) is not hints):
        raise UsageError(f"{key} must be {hints.__name__}, got {value!r}")
    return value


def _apply(cfg: TrainCfg, items) -> None:
    for key, value in items:
        obj, f = _resolve(cfg, key)
        setattr(obj, f.name, _coerce(key, value, typing.get_type_hints(type(obj))[f.name]))


def apply_overrides(cfg: TrainCfg, assignments: list[str]) -> TrainCfg:
    """Apply `section.key=value` strings; values are Python literals (a bare word is a string)."""
    items = []
    for a in assignments:
        key, sep, raw = a.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {a!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # unquoted strings: --set mixed_precision=bf16
        items.append((key.strip(), value))
    _apply(cfg, items)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainCfg:
    """Rebuild a TrainCfg from a saved dict (unknown keys are refused by name)."""
    cfg = TrainCfg()
    _apply(cfg, _flatten(d))
    return cfg


def load_config(path: str | Path) -> TrainCfg:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    if not isinstance(d, dict):
        raise UsageError(f"config {path} must hold a JSON object")
    cfg = get_preset(d.pop("preset", "small"))
    _apply(cfg, _flatten(d))
    return cfg


def _flatten(d: dict):
    """{"unet": {"lr": 1}} -> ("unet.lr", 1)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from ((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            yield (k, v)


# Allowed range (inclusive) of every numeric training key, checked by `validate` before a run writes
# anything; a tuple field's range applies to each of its items. tests/test_config.py checks that no
# numeric field of the dataclasses above is missing here.
BIG = 10**9
RANGES: dict[str, tuple[float, float]] = {
    "data.res": (8, 4096), "data.holdout": (0.0, 0.9), "data.max_pixels": (1, 1 << 31),
    "data.shapes_n": (1, BIG), "data.shapes_seed": (0, 2**63 - 1),
    "tokenizer.vocab_size": (257, 1 << 20), "tokenizer.context_length": (4, 4096),
    "clip.embed_dim": (1, 1 << 16), "clip.vision_width": (1, 1 << 16), "clip.vision_layers": (1, 256),
    "clip.patch_size": (1, 4096), "clip.text_width": (1, 1 << 16), "clip.text_layers": (1, 256),
    "clip.heads": (1, 1024), "clip.steps": (1, BIG), "clip.batch_size": (2, 1 << 20), "clip.lr": (1e-12, 10.0),
    "clip.warmup": (0, BIG), "clip.weight_decay": (0.0, 10.0), "clip.negatives": (1, 16),
    "vae.channels": (1, 1 << 16), "vae.latent_channels": (1, 1024), "vae.layers_per_block": (1, 64),
    "vae.norm_groups": (0, 1 << 16), "vae.steps": (1, BIG), "vae.batch_size": (1, 1 << 20),
    "vae.lr": (1e-12, 10.0), "vae.warmup": (0, BIG), "vae.kl_weight": (0.0, 1e6), "vae.l1_weight": (0.0, 1e6),
    "vae.mse_weight": (0.0, 1e6), "vae.crop": (0, 4096),
    "unet.channels": (1, 1 << 16), "unet.layers_per_block": (1, 64), "unet.transformer_layers": (1, 64),
    "unet.head_dim": (1, 1 << 16),
    "unet.steps": (1, BIG), "unet.batch_size": (1, 1 << 20), "unet.lr": (1e-12, 10.0), "unet.warmup": (0, BIG),
    "unet.train_timesteps": (2, 1 << 20), "unet.snr_gamma": (0.0, 1e6), "unet.logit_mean": (-100.0, 100.0),
    "unet.logit_std": (1e-6, 100.0), "unet.uniform_share": (0.0, 1.0), "unet.caption_dropout": (0.0, 1.0),
    "unet.text_encoder_lr": (0.0, 10.0), "unet.grounding_weight": (0.0, 1e6), "unet.grounding_min_t": (0, 999),
    "unet.relation_contrast": (0.0, 1e6), "unet.contrast_margin": (0.0, 10.0), "unet.contrast_min_t": (0, 999),
    "unet.ema_decay": (0.0, 1.0),
    "seed": (0, 2**63 - 1), "checkpoint_every": (1, BIG), "eval_every": (1, BIG), "log_every": (1, BIG),
}


def validate(cfg: TrainCfg) -> TrainCfg:
    """Check every numeric key against RANGES; a UsageError names the key, its value and the range."""
    import math

    for key, (low, high) in RANGES.items():
        obj, f = _resolve(cfg, key)
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # the type was checked when the value was set
            if not (math.isfinite(v) and low <= v <= high):
                raise UsageError(f"{key} must be between {low:g} and {high:g}, got {value!r}")
    from .clip import ALL_EDIT_KINDS

    unknown = [k for k in cfg.clip.negative_kinds if k not in ALL_EDIT_KINDS]
    if unknown or not cfg.clip.negative_kinds:
        what = f"unknown edit {unknown[0]!r}" if unknown else "empty"
        raise UsageError(f"clip.negative_kinds: {what} (choose from {', '.join(ALL_EDIT_KINDS)})")
    if cfg.unet.text_bidirectional and cfg.unet.text_encoder_lr <= 0:
        raise UsageError("unet.text_bidirectional needs unet.text_encoder_lr > 0: the tower has to learn to read "
                         "both ways")
    from .shapesworld.spec import mix_categories

    try:
        mix_categories(cfg.data.shapes_mix)
    except ValueError as e:
        raise UsageError(f"data.shapes_mix: {e}") from None
    return cfg


# ---------------------------------------------------------------- generation

DEFAULT_SCHEDULER = "DPM++ 2M"  # a name of pipeline.SCHEDULERS
DEFAULT_STRENGTH = 0.75  # img2img: the share of the schedule re-run when an init image is given
MAX_SIDE = 2048
MAX_STEPS = 1000
MAX_IMAGES = 256
MAX_GUIDANCE = 50.0
MAX_LAYOUT_SEARCH = 16  # candidate noises per image
MAX_MEAN_PRIOR = 16.0  # gain of the mean prior
MEAN_PRIOR_RELATIONS = 1000  # relation-variant groups of a ShapesWorld mean prior fit (4 prompts x 8 renders each)
MEAN_PRIOR_STEPS = {"relations": 1500, "plain": 3000}  # `sfumato prior` defaults, by fit (docs/recipe.md, round 18)
MEAN_PRIOR_GAIN = {"relations": 8.0, "plain": 4.0}


@dataclass
class GenerationSettings:
    """One generation: the defaults of `sfumato generate`, the server's request fields and
    Pipeline.generate, and the AUTOMATIC1111 `parameters` text written into each PNG."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    scheduler: str = DEFAULT_SCHEDULER
    width: int = 0  # 0: the model's native size
    height: int = 0
    strength: float | None = None  # img2img / inpainting
    # Candidate noises for a prompt that names a spatial relation (sfumato.layout); 0: off. Opt-in: it
    # chooses among samples, so what the model draws by itself is measured without it.
    layout_search: int = 0
    # Gain of the model's mean prior (sfumato.mean_prior) on the first few-step estimate; 0: off. A model
    # with a prior says its own in its card.
    mean_prior: float = 0.0
    extra: dict = field(default_factory=dict)

    def parameters(self, model_name: str, model_hash: str) -> str:
        """AUTOMATIC1111's `parameters` text: prompt, negative prompt, then a comma-separated line."""
        line = [f"Steps: {self.steps}", f"Sampler: {self.scheduler}", f"CFG scale: {self.guidance:g}",
                f"Seed: {self.seed}", f"Size: {self.width}x{self.height}", f"Model hash: {model_hash}",
                f"Model: {model_name}"]
        if self.strength is not None:
            line.append(f"Denoising strength: {self.strength:g}")
        if self.mean_prior:
            line.append(f"Mean prior: {self.mean_prior:g}")
        line += [f"{k}: {v}" for k, v in self.extra.items()]
        neg = f"\nNegative prompt: {self.negative}" if self.negative else ""
        return f"{self.prompt}{neg}\n" + ", ".join(line)


def parse_parameters(text: str) -> dict:
    """Inverse of GenerationSettings.parameters (AUTOMATIC1111 format)."""
    lines = text.strip().split("\n")
    out: dict = {"prompt": "", "negative_prompt": ""}
    settings = lines[-1] if lines and lines[-1].startswith("Steps:") else ""
    body = lines[:-1] if settings else lines
    neg_at = next((i for i, l in enumerate(body) if l.startswith("Negative prompt:")), len(body))
    out["prompt"] = "\n".join(body[:neg_at])
    out["negative_prompt"] = "\n".join(body[neg_at:])[len("Negative prompt:"):].strip()
    for part in settings.split(", "):
        k, sep, v = part.partition(": ")
        if sep:
            out[k] = v
    return out

