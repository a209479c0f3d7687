"""The denoising loop: text -> latents -> image, with classifier-free guidance, on any diffusers scheduler.

One readable loop after step 7 of diffusers' StableDiffusionPipeline; samplers are swapped with
`Cls.from_config(old.config)`. The callback contract follows k-diffusion: a dict with i, t, latents.
"""

from __future__ import annotations

from typing import Callable

import torch


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, context), padded to the full context as the UNet was trained to read them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Last hidden states of the text tower, (B, context, width)."""
    return text_encoder(prompt_ids(tokenizer, prompts).to(text_encoder.device))[0]


def guidance_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance-scale input of a distilled (LCM) UNet, as plain diffusers computes it at sampling
    time (w = guidance - 1); taken from the pipeline itself so that training and sampling agree."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, guidance - 1, embedding_dim=dim)


def seeded_noise(shape: tuple[int, ...], n: int, seed: int, device="cpu"):
    """Initial noise for n images, image i from its own generator seeded seed + i, so an image
    does not depend on how many were drawn with it. Returns (noise, generators); stochastic
    samplers (Euler a, DDPM, LCM) draw their per-step noise from the same generators."""
    return noise_of_seeds(shape, [seed + i for i in range(n)], device)


def noise_of_seeds(shape: tuple[int, ...], seeds: list[int], device="cpu"):
    """seeded_noise for a list of seeds, one image each."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return noise, gens


def denoise(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int,
            guidance: float, callback: Callable[[dict], None] | None = None,
            generator: list[torch.Generator] | torch.Generator | None = None,
            init_latents: torch.Tensor | None = None, strength: float = 1.0,
            mask: torch.Tensor | None = None, until: int | None = None, grad: bool = False,
            first_shift: torch.Tensor | None = None) -> torch.Tensor:
    """Run the sampler from `noise` to x0 latents (with `until`: stop after that many steps).

    With `init_latents` (img2img), the first (1 - strength) of the schedule is skipped and sampling
    starts from the noised init; with `mask` (inpainting, 1 = repaint) the unmasked latents are put
    back at each step's noise level (blended diffusion). With `grad`, gradients flow through every
    step (training through the sampler, `sfumato.relation_reward`). `first_shift` (latent-shaped) moves
    the first step's estimate of the clean latents (the mean prior, `sfumato.mean_prior`)."""
    with torch.set_grad_enabled(grad):
        return _denoise(unet, scheduler, cond, uncond, noise, steps, guidance, callback, generator,
                        init_latents, strength, mask, until, first_shift)


def shifted_prediction(pred: torch.Tensor, shift: torch.Tensor, latents: torch.Tensor, scheduler, t) -> torch.Tensor:
    """The model output whose clean-latent estimate is the given one's plus `shift`, in the scheduler's
    prediction type (x0 = a x - s v for v, (x - s eps) / a for epsilon, with a^2 = alpha_bar_t)."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return pred + shift
    a_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)]
    a, s = a_bar.sqrt(), (1 - a_bar).sqrt()
    if kind == "v_prediction":
        return pred - shift / s
    if kind == "epsilon":
        return pred - a * shift / s
    raise ValueError(f"a first-step shift needs a prediction type of sample, epsilon or v_prediction, got {kind!r}")


def _denoise(unet, scheduler, cond, uncond, noise, steps, guidance, callback, generator, init_latents, strength,
             mask, until, first_shift):
    # 1. timesteps, and where img2img enters them
    scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
        if hasattr(scheduler, "set_begin_index"):
            # Count steps from the start rather than look each timestep up: Karras sigmas on a
            # zero-terminal-SNR schedule map several high sigmas to one integer timestep.
            scheduler.set_begin_index(0)
    else:
        start = steps - min(int(round(steps * strength)), steps)
        timesteps = timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        init_latents = init_latents.expand_as(noise)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    # A distilled UNet takes the guidance scale as an input: one pass per step, no unconditional half.
    dim = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
    w_emb = None if dim is None else guidance_embedding(torch.full((len(noise),), float(guidance)), dim).to(
        noise.device, noise.dtype)
    use_cfg = guidance != 1.0 and w_emb is None
    guided = {} if w_emb is None else {"timestep_cond": w_emb}
    context = torch.cat([uncond, cond]) if use_cfg else cond
    extra = {"generator": generator} if generator is not None and "generator" in _step_params(scheduler) else {}
    for i, t in enumerate(timesteps if until is None else timesteps[:until * scheduler.order]):
        # 2. the model input, doubled for guidance
        x = torch.cat([latents] * 2) if use_cfg else latents
        x = scheduler.scale_model_input(x, t)
        # 3. predict and guide
        pred = unet(x, t, encoder_hidden_states=context, **guided).sample
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        if first_shift is not None and i == 0:
            pred = shifted_prediction(pred, first_shift, latents, scheduler, t)
        # 4. one sampler step
        stepped = scheduler.step(pred, t, latents, **extra, return_dict=False)
        latents = stepped[0]
        if mask is not None:
            base = init_latents
            if i + 1 < len(timesteps):
                base = scheduler.add_noise(base, noise, timesteps[i + 1:i + 2])
            latents = mask * latents + (1 - mask) * base
        if callback is not None:
            # x0: the step's estimate of the clean latents, where the sampler returns one (DDIM, Euler, LCM)
            callback({"i": i, "t": int(t), "latents": latents, "total": len(timesteps),
                      "x0": stepped[1] if len(stepped) > 1 else None})
    return latents


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


@torch.no_grad()
def encode_images(vae, images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> latents (the posterior's mode, scaled): decode_latents' inverse."""
    from .data import to_model_range

    x = to_model_range(images_u8).to(vae.device)
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 images (B, H, W, 3)."""
    from .data import from_model_range

    x = vae.decode(latents / vae.config.scaling_factor).sample
    return from_model_range(x).permute(0, 2, 3, 1).cpu()
