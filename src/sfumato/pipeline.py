"""Load a diffusers-layout model folder and generate: text-to-image, img2img, inpainting.

    import sfumato
    pipe = sfumato.load()                        # the shipped default model
    images = pipe.generate(sfumato.GenerationSettings("two red squares", seed=1))
    images[0].info["parameters"]                 # AUTOMATIC1111-style generation parameters

Any Stable Diffusion 1.x/2.x folder in the diffusers layout loads too (`sfumato.load("path/to/sd15")`);
weights are read from safetensors only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .attention import capture_cross_attention
from .config import (DEFAULT_STRENGTH, MAX_GUIDANCE, MAX_IMAGES, MAX_LAYOUT_SEARCH, MAX_MEAN_PRIOR, MAX_SIDE,
                     MAX_STEPS, GenerationSettings, parse_parameters)
from .errors import SfumatoError, UsageError
from .files import sha256_bytes
from .layout import candidate_seeds, find_relation, look_ahead, margins
from .mean_prior import FOLDER as MEAN_PRIOR
from .mean_prior import MeanPrior, layout_shift
from .models import load_text_encoder, quiet_libraries
from .prompts import check_weights, tokenize
from .prompts import encode as encode_prompt_syntax
from .sampling import decode_latents, denoise, encode_images, noise_of_seeds

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"
__all__ = ["DEFAULT_MODEL", "FAST_UNET", "SCHEDULERS", "GenerationSettings", "Pipeline", "load", "make_scheduler",
           "parse_parameters"]

# AUTOMATIC1111 sampler names -> (diffusers scheduler class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "LCM": ("LCMScheduler", {}),  # distilled folders only (`sfumato distill`)
    # Trajectory consistency sampling (Zheng et al., 2024) of the same distilled UNet: each step keeps part
    # of the predicted trajectory (gamma 0.3) instead of re-noising from scratch as LCM does.
    "TCD": ("TCDScheduler", {}),
}


def list_schedulers() -> list[str]:
    return list(SCHEDULERS)


DISTILLED_ONLY = ("LCM", "TCD")  # samplers that need a UNet with a guidance input

# A model folder may carry a few-step (distilled) UNet beside its own (`sfumato distill MODEL --attach`):
# the folder then samples in a few LCM steps by default and keeps every other sampler on its unet/.
# Plain diffusers ignores the extra folder; it loads as UNet2DConditionModel(MODEL, subfolder="unet_lcm").
FAST_UNET = "unet_lcm"
# LCM steps of a distilled UNet by default. On the default model 8 scored highest and 6 kept the full
# sampler's score at three quarters of the time (4 did not); 6 it is (docs/speed.md).
FAST_STEPS = 6


def make_scheduler(name: str, base_config):
    """A fresh scheduler of the named kind on the model's noise schedule (schedulers hold state)."""
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    # Building one computes its 1,000-step schedule in Python (~10 ms, a tenth of a few-step image):
    # build each kind once and hand out copies.
    return copy.deepcopy(_scheduler_template(name, json.dumps(dict(base_config), sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _scheduler_template(name: str, config_json: str):
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    cfg = json.loads(config_json)
    if cfg.get("rescale_betas_zero_snr"):
        cfg["timestep_spacing"] = "trailing"  # zero terminal SNR needs the last timestep sampled
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            # LMS and Heun would silently sample another schedule: hand them the model's own betas.
            cfg["trained_betas"] = zero_snr_betas(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(cfg, **overrides)


def zero_snr_betas(config) -> list[float]:
    """The betas of a zero-terminal-SNR schedule with the last alpha-bar clamped to 2**-24, as diffusers'
    Euler and DPM schedulers do, so that schedulers without the option get a finite largest sigma."""
    from diffusers import DDPMScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ddpm = DDPMScheduler.from_config({**dict(config), "rescale_betas_zero_snr": True})
    abar = ddpm.alphas_cumprod.double().clone()
    abar[-1] = 2.0**-24
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return betas.tolist()


def _card_generation(folder: Path | None) -> tuple[dict, dict]:
    """A model folder's generation defaults from its sfumato.json: "generation" (what it samples with
    when nothing is asked) and "full_generation" (another sampler asked of a folder with a few-step UNet)."""
    card = folder / "sfumato.json" if folder else None
    saved = {}
    if card is not None and card.is_file():
        try:
            saved = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
    keep = ("scheduler", "steps", "guidance", "mean_prior")
    pick = [saved.get(k) if isinstance(saved, dict) else None for k in ("generation", "full_generation")]
    return tuple({k: d[k] for k in keep if k in d} if isinstance(d, dict) else {} for d in pick)


def model_hash(folder: Path, part: str = "unet") -> str:
    """Short hash of the UNet weights (as A1111 shows a checkpoint hash); `part`: another UNet's folder."""
    f = next(iter(sorted((folder / part).glob("*.safetensors"))), None)
    if f is None:
        return "unknown"
    with open(f, "rb") as fh:
        head = fh.read(1 << 20)  # the header and first MiB identify the file well enough
    return sha256_bytes(head + str(f.stat().st_size).encode())[:10]


class Pipeline:
    """The components of a model (from a folder by `load`, or in memory) plus generate()."""

    def __init__(self, folder: Path | None, tokenizer, text_encoder, vae, unet, scheduler_config, device="cpu",
                 name: str | None = None, fast_unet=None, prior=None):
        self.folder, self.tokenizer, self.text_encoder = folder, tokenizer, text_encoder
        self.vae, self.unet, self.scheduler_config, self.device = vae, unet, dict(scheduler_config), device
        default = "sfumato-default" if folder == DEFAULT_MODEL else folder.name if folder else "in-memory"
        self.name = name or default
        self.hash = model_hash(folder) if folder else "unknown"
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.native = unet.config.sample_size * self.factor
        self.multiple = self.factor * 2 ** (len(unet.config.block_out_channels) - 1)
        # The UNet of the few-step samplers (a distilled folder's own, or one carried beside it) and
        # the UNet of every other sampler (None for a distilled folder: it has no other).
        guided = unet.config.time_cond_proj_dim is not None
        self.fast_unet = unet if guided else fast_unet
        self.full_unet = None if guided else unet
        self.distilled = self.full_unet is None  # few-step sampling only
        self.prior = prior  # the mean prior of the few-step UNet (sfumato.mean_prior), if the folder has one
        generation, full = _card_generation(folder)
        if self.fast_unet is not None:
            generation = {"scheduler": "LCM", "steps": FAST_STEPS, **generation}
        if prior is None:  # a copy of the folder without its prior (or a card written for another)
            generation.pop("mean_prior", None)
        self.defaults = generation
        self.full_defaults = full if self.fast_unet is not None and self.full_unet is not None else generation
        self.graphs: dict = {}  # ONNX Runtime graphs standing in for the modules (export.graphs_for)
        self._states: dict = {}  # text states of the last prompts encoded

    def settings(self, prompt: str, **given) -> GenerationSettings:
        """GenerationSettings with this model's own defaults for every field not given: a few LCM steps
        where the model has a distilled UNet, unless another sampler is asked for."""
        given = {k: v for k, v in given.items() if v is not None}
        few = given.get("scheduler", self.defaults.get("scheduler")) in DISTILLED_ONLY
        return GenerationSettings(prompt, **{**(self.defaults if few else self.full_defaults), **given})

    def unet_for(self, scheduler: str):
        """The UNet that samples with this scheduler (checked by `check`)."""
        return self.fast_unet if scheduler in DISTILLED_ONLY else self.full_unet

    def _runners(self, unet, s: GenerationSettings, capture: bool):
        """The UNet and VAE decoder to run: their ONNX graphs where the folder has a valid export, at the
        native size (elsewhere a step is long enough for PyTorch's per-layer cancel checks to matter)
        and without attention capture (which hooks the PyTorch modules)."""
        if capture or not self.graphs or (s.width, s.height) != (self.native, self.native):
            return unet, self.vae
        name = FAST_UNET if unet is self.fast_unet else "unet"  # export's graph names
        return self.graphs.get(name, unet), self.graphs.get("vae_decoder", self.vae)

    # ---------------------------------------------------------------- prompts

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Text states (B, L, D) of prompts in AUTOMATIC1111's syntax ((word:1.3), [word], BREAK); a prompt
        longer than the context is encoded in chunks (L is a multiple of it). Also notes on the syntax,
        such as a bracket never closed."""
        key = tuple(prompts)
        if key not in self._states:  # a designer draws one prompt with seed after seed
            if len(self._states) >= 16:
                self._states.pop(next(iter(self._states)))
            self._states[key] = encode_prompt_syntax(self.tokenizer, self.text_encoder, prompts)
        return self._states[key]

    # ---------------------------------------------------------------- generation

    def check(self, s: GenerationSettings, n: int) -> GenerationSettings:
        """Validate settings against the limits; fill in the native size."""
        if not s.prompt.strip():
            raise UsageError("the prompt is empty")
        check_weights(s.prompt)
        check_weights(s.negative)
        if not 1 <= s.steps <= MAX_STEPS:
            raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, got {s.steps}")
        if not 1 <= n <= MAX_IMAGES:
            raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES}, got {n}")
        if not 0 <= s.guidance <= MAX_GUIDANCE:
            raise UsageError(f"--guidance must be between 0 and {MAX_GUIDANCE:g}, got {s.guidance}")
        if not 0 <= s.mean_prior <= MAX_MEAN_PRIOR:
            raise UsageError(f"--mean-prior must be between 0 and {MAX_MEAN_PRIOR:g}, got {s.mean_prior:g}")
        if s.mean_prior and self.prior is None:
            raise UsageError(f"{self.name} has no mean prior ({MEAN_PRIOR}/); fit one with `sfumato prior MODEL`, "
                             f"or pass --mean-prior 0")
        if s.mean_prior and s.scheduler not in DISTILLED_ONLY:
            raise UsageError(f"the mean prior was fitted to the few-step UNet: it moves the first step of "
                             f"{' or '.join(DISTILLED_ONLY)} sampling only (got {s.scheduler!r}); pass --mean-prior 0")
        if not 0 <= s.layout_search <= MAX_LAYOUT_SEARCH:
            raise UsageError(f"--layout-search must be between 0 and {MAX_LAYOUT_SEARCH} candidate noises, "
                             f"got {s.layout_search}")
        if s.strength is not None and not 0 <= s.strength <= 1:
            raise UsageError(f"--strength must be between 0 and 1, got {s.strength}")
        make_scheduler(s.scheduler, self.scheduler_config)  # unknown names fail here
        if s.scheduler in DISTILLED_ONLY and self.fast_unet is None:
            raise UsageError(f"--scheduler {s.scheduler} samples distilled few-step models only (made by "
                             f"`sfumato distill`); {self.name} is not one")
        if self.distilled and s.scheduler not in DISTILLED_ONLY:
            raise UsageError(f"{self.name} is a distilled few-step model: it samples with --scheduler "
                             f"{' or '.join(DISTILLED_ONLY)} only (got {s.scheduler!r}); use its teacher model "
                             f"for other samplers")
        s.width, s.height = s.width or self.native, s.height or self.native
        for side in (s.width, s.height):
            if not self.multiple <= side <= MAX_SIDE or side % self.multiple:
                raise UsageError(f"--size must be a multiple of {self.multiple} between {self.multiple} "
                                 f"and {MAX_SIDE} px, got {s.width}x{s.height}")
        return s

    @torch.no_grad()
    def generate(self, settings: GenerationSettings, n: int = 1, init_image: Image.Image | None = None,
                 mask: Image.Image | None = None, callback: Callable[[dict], None] | None = None,
                 capture: bool = False, prompts: list[str] | None = None):
        """Generate n images; image i uses settings.seed + i. The one way sfumato samples.

        Args:
            settings: prompt, negative prompt, seed, steps, guidance, scheduler, size (0: native) and,
                with an init image, strength (None: DEFAULT_STRENGTH). Not modified.
            n: images to draw.
            init_image: start from this image (img2img); mask: with it, white = repaint (inpainting).
            callback: called after each sampler step with {"i", "t", "latents", "total"} (once per
                batch when `prompts` differ in length: each length is drawn as a batch of its own).
            capture: also record the cross-attention of every image (for per-word maps).
            prompts: one prompt per image in one batch, instead of n times settings.prompt (n is then
                len(prompts)); training draws its sample grids this way.
        Returns:
            PIL images with info["parameters"]; with capture, (images, token maps (n, T, H, W)).
        """
        strength = None
        if init_image is not None:
            strength = DEFAULT_STRENGTH if settings.strength is None else settings.strength
        texts = [settings.prompt] * n if prompts is None else list(prompts)
        n = len(texts)
        if any(not t.strip() for t in texts[1:]):
            raise UsageError("the prompt is empty")
        s = self.check(dataclasses.replace(settings, prompt=texts[0] if texts else "", strength=strength), n)
        for t in texts[1:]:
            check_weights(t)
        init = self._init_latents(init_image, mask, s)
        # Prompt and negative are padded to the same number of chunks. Prompts of another length are
        # drawn in their own batch, so padding never changes an image from what it is drawn alone.
        groups: dict[int, list[int]] = {}
        k_neg = len(tokenize(self.tokenizer, s.negative).ids)
        for i, t in enumerate(texts):
            groups.setdefault(max(len(tokenize(self.tokenizer, t).ids), k_neg), []).append(i)
        if capture and len(groups) > 1:
            raise UsageError("explain maps one batch of prompts of one length; draw these prompts apart")
        batches = []
        for idx in groups.values():
            states, notes = self.encode([texts[i] for i in idx] + [s.negative] * len(idx))
            batches.append((idx, states[:len(idx)], states[len(idx):]))
            for note in notes:
                warnings.warn(note, stacklevel=2)
        unet = self.unet_for(s.scheduler)
        runner, decoder = self._runners(unet, s, capture)
        shape = (unet.config.in_channels, s.height // self.factor, s.width // self.factor)
        doubled = s.guidance != 1.0 and unet.config.time_cond_proj_dim is None  # an unconditional half
        drawn = self._search_layouts(unet, s, texts, batches, shape, doubled) if init is None else {}
        noise, gens = noise_of_seeds(shape, [drawn.get(i, s.seed + i) for i in range(n)], self.device)
        recording = capture_cross_attention(unet, s.height, s.width, cfg=doubled) if capture else nullcontext()
        with recording as store:
            if init is not None and round(s.steps * s.strength) == 0:
                pixels = np.repeat(init["pixels"][None], n, axis=0)  # nothing to re-run: the input as it is
            else:
                src = init or {"latents": None, "mask_lat": None}
                latents = torch.empty_like(noise)
                for idx, cond, uncond in batches:
                    sched = make_scheduler(s.scheduler, self.scheduler_config)  # schedulers hold state
                    shift = self._first_shift(s, cond, shape) if init is None else None  # img2img: no first step
                    latents[idx] = denoise(runner, sched, cond, uncond, noise[idx], s.steps, s.guidance, callback,
                                           [gens[i] for i in idx], src["latents"], s.strength or 1.0, src["mask_lat"],
                                           first_shift=shift)
                pixels = decode_latents(decoder, latents).numpy()
        if capture and store.calls == 0:
            raise UsageError("explain has nothing to show: at this strength the model never runs (the init image "
                             "comes back unchanged); raise the strength or drop explain")
        if init is not None and init["mask_px"] is not None:  # keep unmasked pixels exactly
            m = init["mask_px"][..., None]
            pixels = np.where(m > 0, pixels, init["pixels"][None]).astype(np.uint8)
        images = []
        for i, a in enumerate(pixels):
            img = Image.fromarray(a)
            extra = {**s.extra, "Layout search": s.layout_search, "Layout seed": drawn[i]} if i in drawn else s.extra
            img.info["parameters"] = dataclasses.replace(s, prompt=texts[i], seed=s.seed + i, extra=extra).parameters(
                self.name, self.hash)
            images.append(img)
        return (images, store.maps()) if capture else images

    def _first_shift(self, s: GenerationSettings, cond: torch.Tensor, shape: tuple) -> torch.Tensor | None:
        """The mean prior's move of the first clean estimate for these text states, or None (off)."""
        if not s.mean_prior:
            return None
        return layout_shift(self.prior, cond, s.mean_prior, shape[1:]).to(cond.device, cond.dtype)

    def _search_layouts(self, unet, s: GenerationSettings, texts: list[str], batches, shape, doubled: bool
                        ) -> dict[int, int]:
        """Layout search (sfumato.layout): for each image whose prompt names one spatial relation, the
        seed among s.layout_search candidates whose first half of sampling puts the two objects' words
        most clearly in that relation (the image's own seed is candidate 0)."""
        drawn: dict[int, int] = {}
        if s.layout_search < 2:
            return drawn
        until = look_ahead(s.steps)
        for idx, cond, uncond in batches:
            for j, i in enumerate(idx):
                rel = find_relation(self.tokenizer, texts[i])
                if rel is None:
                    continue
                seeds = candidate_seeds(s.seed + i, s.layout_search)
                noise, gens = noise_of_seeds(shape, seeds, self.device)
                k = len(seeds)
                sched = make_scheduler(s.scheduler, self.scheduler_config)
                with capture_cross_attention(unet, s.height, s.width, cfg=doubled, finest=True) as store:

                    def keep_last_step(state):
                        if state["i"] + 1 < until:
                            store.reset()

                    shift = self._first_shift(s, cond[j:j + 1], shape)
                    denoise(unet, sched, cond[j:j + 1].expand(k, -1, -1), uncond[j:j + 1].expand(k, -1, -1), noise,
                            s.steps, s.guidance, keep_last_step, gens, until=until, first_shift=shift)
                score = margins(store.maps(), rel)
                drawn[i] = seeds[max(range(k), key=score.__getitem__)]
        return drawn

    def _init_latents(self, init_image, mask, s: GenerationSettings) -> dict | None:
        if init_image is None:
            if mask is not None:
                raise UsageError("--mask needs --init-image")
            return None
        img = init_image.convert("RGB")
        if img.size != (s.width, s.height):
            img = img.resize((s.width, s.height), Image.BICUBIC)
        pixels = np.array(img)  # writable: torch.from_numpy warns on read-only arrays
        z = encode_images(self.vae, torch.from_numpy(pixels).permute(2, 0, 1)[None])
        mask_px = mask_lat = None
        if mask is not None:
            if mask.size != init_image.size:
                raise UsageError(f"--mask is {mask.size[0]}x{mask.size[1]} but --init-image is "
                                 f"{init_image.size[0]}x{init_image.size[1]}; they must match")
            m = mask.convert("L").resize((s.width, s.height), Image.NEAREST)
            mask_px = (np.asarray(m) >= 128).astype(np.uint8)  # white = repaint
            small = m.resize((s.width // self.factor, s.height // self.factor), Image.BOX)
            # Any latent pixel touched by the mask is repainted; the rest follows the init image.
            mask_lat = torch.from_numpy((np.asarray(small) > 0).astype(np.float32))[None, None].to(self.device)
        return {"latents": z, "pixels": pixels, "mask_px": mask_px, "mask_lat": mask_lat}


def load(model: str | Path | None = None, device: str | None = None, onnx: bool | None = None) -> Pipeline:
    """Load a diffusers-layout Stable Diffusion folder (default: the shipped model).

    On a CPU the folder's ONNX export (`sfumato export`) runs the UNet and VAE decoder when it matches
    the weights (onnx=None: if there is one; True: it must be there and valid; False: PyTorch only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = Path(model) if model else DEFAULT_MODEL
    if not folder.is_dir():
        if model is None:
            raise SfumatoError(f"the default model is missing from this installation ({folder})")
        if folder.is_file():
            raise UsageError(f"{folder} is a single-file checkpoint; sfumato loads diffusers folders: convert it once "
                             f"with diffusers' StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR, "
                             f"safe_serialization=True)")
        raise UsageError(f"model folder {folder} does not exist")
    missing = [c for c in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise UsageError(f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/")
    _check_weights(folder)
    _check_channels(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet_libraries()
    try:
        kw = {"local_files_only": True, "use_safetensors": True}
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = load_text_encoder(folder / "text_encoder", **kw).to(device).eval()
        vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).to(device).eval()
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw).to(device).eval()
        fast = prior = None
        if (folder / FAST_UNET).is_dir():
            fast = UNet2DConditionModel.from_pretrained(folder / FAST_UNET, **kw).to(device).eval()
        if (folder / MEAN_PRIOR).is_dir():
            prior = MeanPrior.from_pretrained(folder / MEAN_PRIOR, **kw).to(device).eval()
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise SfumatoError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from None
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    if fast is not None:
        _check_fast_unet(folder, unet, fast)
    if prior is not None:
        _check_prior(folder)
    pipe = Pipeline(folder, tokenizer, text_encoder, vae, unet, sched_cfg, device, fast_unet=fast, prior=prior)
    if onnx is not False and device == "cpu":
        from .export import graphs_for

        pipe.graphs = graphs_for(pipe, required=bool(onnx))
    elif onnx:
        raise UsageError(f"ONNX graphs run on the CPU only (this pipeline is on {device})")
    return pipe


def _check_fast_unet(folder: Path, unet, fast) -> None:
    """A carried few-step UNet must be a distilled copy of the folder's own (and is said to be stale
    once unet/ was trained on after it was distilled)."""
    same = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "block_out_channels")
    if fast.config.time_cond_proj_dim is None or unet.config.time_cond_proj_dim is not None:
        raise UsageError(f"{folder / FAST_UNET} must hold a distilled UNet (with a guidance input, made by "
                         f"`sfumato distill --attach`) beside an undistilled unet/")
    for key in same:
        if fast.config[key] != unet.config[key]:
            raise UsageError(f"{folder / FAST_UNET} does not fit {folder / 'unet'}: {key} "
                             f"{fast.config[key]} against {unet.config[key]}")
    try:
        teacher = json.loads((folder / "sfumato.json").read_text())["distilled"]["teacher_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if teacher != model_hash(folder):
        warnings.warn(f"{folder / FAST_UNET} was distilled from another unet/ than the one there now: few-step "
                      f"images follow the old one; distil again with `sfumato distill {folder} --attach --overwrite`",
                      stacklevel=3)


def _check_prior(folder: Path) -> None:
    """A mean prior is fitted to one few-step UNet's first estimates; say so once that UNet has changed."""
    try:
        fitted = json.loads((folder / "sfumato.json").read_text())["mean_prior"]
        part, fitted_hash = fitted["unet"], fitted["unet_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if model_hash(folder, part) != fitted_hash:
        warnings.warn(f"{folder / MEAN_PRIOR} was fitted to another {part}/ than the one there now: it moves first "
                      f"estimates by what that UNet lacked; fit it again with `sfumato prior {folder} --overwrite`",
                      stacklevel=3)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _check_weights(folder: Path) -> None:
    """Weights are read from safetensors only: unpickling a .bin file can run any code in it."""
    for part in ("text_encoder", "vae", "unet", FAST_UNET, MEAN_PRIOR):
        if not (folder / part).is_dir():
            continue
        files = [f for f in (folder / part).iterdir() if f.is_file()]
        if any(f.name.endswith(".safetensors") for f in files):
            continue
        pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"{folder / part} holds only pickle weights ({', '.join(pickles)}), which sfumato refuses: loading "
                f"them can run code hidden in the file. Convert the model once where you trust it: "
                f"StableDiffusionPipeline.from_pretrained(\"{folder}\", use_safetensors=False)"
                f".save_pretrained(DIR, safe_serialization=True), then pass --model DIR")


def _check_channels(folder: Path) -> None:
    """The UNet must take the VAE's latents and nothing else (inpainting UNets also take a mask and
    the masked image's latents; depth or instruct UNets other extra channels)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        got, want = int(unet["in_channels"]), int(vae["latent_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # loading says what is wrong with the files
    if got == want:
        return
    kind = " (an inpainting checkpoint: latents, mask and masked image)" if got == 2 * want + 1 else ""
    raise UsageError(f"{folder}: its UNet takes {got} input channels{kind}, and sfumato draws with UNets that take the "
                     f"VAE's {want} latent channels; use the text-to-image version of this model (it inpaints with "
                     f"--init-image and --mask)")
