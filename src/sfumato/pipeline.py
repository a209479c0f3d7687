"""Load a diffusers-layout model folder and generate: text-to-image, img2img, inpainting.

    import sfumato
    pipe = sfumato.load()                        # the shipped default model
    images = pipe.generate(sfumato.GenerationSettings("two red squares", seed=1))
    images[0].info["parameters"]                 # AUTOMATIC1111-style generation parameters

Any Stable Diffusion 1.x/2.x folder in the diffusers layout loads too (`sfumato.load("path/to/sd15")`);
weights are read from safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .attention import capture_cross_attention
from .config import (DEFAULT_STRENGTH, MAX_GUIDANCE, MAX_IMAGES, MAX_SIDE, MAX_STEPS, GenerationSettings,
                     parse_parameters)
from .data import to_model_range
from .errors import SfumatoError, UsageError
from .files import sha256_bytes
from .models import quiet_libraries
from .sampling import decode_latents, denoise, encode_prompts, seeded_noise

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"
__all__ = ["DEFAULT_MODEL", "SCHEDULERS", "GenerationSettings", "Pipeline", "load", "make_scheduler",
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
}


def list_schedulers() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config):
    """A fresh scheduler of the named kind on the model's noise schedule (schedulers hold state)."""
    import diffusers

    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    cfg = dict(base_config)
    if cfg.get("rescale_betas_zero_snr"):
        cfg["timestep_spacing"] = "trailing"  # zero terminal SNR needs the last timestep sampled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name).from_config(cfg, **overrides)


def model_hash(folder: Path) -> str:
    """Short hash of the UNet weights (as A1111 shows a checkpoint hash)."""
    f = next(iter(sorted((folder / "unet").glob("*.safetensors"))), None)
    if f is None:
        return "unknown"
    with open(f, "rb") as fh:
        head = fh.read(1 << 20)  # the header and first MiB identify the file well enough
    return sha256_bytes(head + str(f.stat().st_size).encode())[:10]


class Pipeline:
    """The components of a model (from a folder by `load`, or in memory) plus generate()."""

    def __init__(self, folder: Path | None, tokenizer, text_encoder, vae, unet, scheduler_config, device="cpu",
                 name: str | None = None):
        self.folder, self.tokenizer, self.text_encoder = folder, tokenizer, text_encoder
        self.vae, self.unet, self.scheduler_config, self.device = vae, unet, dict(scheduler_config), device
        default = "sfumato-default" if folder == DEFAULT_MODEL else folder.name if folder else "in-memory"
        self.name = name or default
        self.hash = model_hash(folder) if folder else "unknown"
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.native = unet.config.sample_size * self.factor
        self.multiple = self.factor * 2 ** (len(unet.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- prompts

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Text states (B, L, D) and a warning for each prompt cut at the context length."""
        tok = self.tokenizer
        n = tok.model_max_length
        full = tok(prompts, truncation=False, verbose=False).input_ids
        notes = []
        for p, ids in zip(prompts, full):
            if len(ids) > n:
                dropped = tok.decode(ids[n - 1:-1]).strip()
                notes.append(f"prompt longer than the {n}-token context; dropped: {dropped!r}")
        return encode_prompts(tok, self.text_encoder, prompts), notes

    # ---------------------------------------------------------------- generation

    def check(self, s: GenerationSettings, n: int) -> GenerationSettings:
        """Validate settings against the limits; fill in the native size."""
        if not s.prompt.strip():
            raise UsageError("the prompt is empty")
        if not 1 <= s.steps <= MAX_STEPS:
            raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, got {s.steps}")
        if not 1 <= n <= MAX_IMAGES:
            raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES}, got {n}")
        if not 0 <= s.guidance <= MAX_GUIDANCE:
            raise UsageError(f"--guidance must be between 0 and {MAX_GUIDANCE:g}, got {s.guidance}")
        if s.strength is not None and not 0 <= s.strength <= 1:
            raise UsageError(f"--strength must be between 0 and 1, got {s.strength}")
        make_scheduler(s.scheduler, self.scheduler_config)  # unknown names fail here
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
            callback: called after each sampler step with {"i", "t", "latents", "total"}.
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
        init = self._init_latents(init_image, mask, s)
        cond, notes = self.encode(texts)
        uncond, _ = self.encode([s.negative] * n)
        for note in notes[:1]:
            warnings.warn(note)
        shape = (self.unet.config.in_channels, s.height // self.factor, s.width // self.factor)
        noise, gens = seeded_noise(shape, n, s.seed, self.device)
        sched = make_scheduler(s.scheduler, self.scheduler_config)
        recording = capture_cross_attention(self.unet, s.height, s.width, cfg=s.guidance != 1.0) if capture \
            else nullcontext()
        with recording as store:
            if init is not None and round(s.steps * s.strength) == 0:
                pixels = np.repeat(init["pixels"][None], n, axis=0)  # nothing to re-run: the input as it is
            else:
                src = init or {"latents": None, "mask_lat": None}
                latents = denoise(self.unet, sched, cond, uncond, noise, s.steps, s.guidance, callback, gens,
                                  src["latents"], s.strength or 1.0, src["mask_lat"])
                pixels = decode_latents(self.vae, latents).numpy()
        if capture and store.calls == 0:
            raise UsageError("explain has nothing to show: at this strength the model never runs (the init image "
                             "comes back unchanged); raise the strength or drop explain")
        if init is not None and init["mask_px"] is not None:  # keep unmasked pixels exactly
            m = init["mask_px"][..., None]
            pixels = np.where(m > 0, pixels, init["pixels"][None]).astype(np.uint8)
        images = []
        for i, a in enumerate(pixels):
            img = Image.fromarray(a)
            img.info["parameters"] = dataclasses.replace(s, prompt=texts[i], seed=s.seed + i).parameters(self.name,
                                                                                                      self.hash)
            images.append(img)
        return (images, store.maps()) if capture else images

    def _init_latents(self, init_image, mask, s: GenerationSettings) -> dict | None:
        if init_image is None:
            if mask is not None:
                raise UsageError("--mask needs --init-image")
            return None
        img = init_image.convert("RGB")
        if img.size != (s.width, s.height):
            img = img.resize((s.width, s.height), Image.BICUBIC)
        pixels = np.array(img)  # writable: torch.from_numpy warns on read-only arrays
        x = to_model_range(torch.from_numpy(pixels).permute(2, 0, 1)[None]).to(self.device)
        z = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
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


def load(model: str | Path | None = None, device: str | None = None) -> Pipeline:
    """Load a diffusers-layout Stable Diffusion folder (default: the shipped model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(model) if model else DEFAULT_MODEL
    if not folder.is_dir():
        if model is None:
            raise SfumatoError(f"the default model is missing from this installation ({folder})")
        raise UsageError(f"model folder {folder} does not exist")
    missing = [c for c in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise UsageError(f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet_libraries()
    try:
        kw = {"local_files_only": True, "use_safetensors": True}
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw).to(device).eval()
        vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).to(device).eval()
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw).to(device).eval()
        sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise SfumatoError(f"cannot load model from {folder}: {str(e).splitlines()[0]}") from None
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    return Pipeline(folder, tokenizer, text_encoder, vae, unet, sched_cfg, device)
