"""What runs on the generation lane: checked generation requests, step previews, per-word maps,
grounding; and the checks every entry point (native or AUTOMATIC1111) applies before queueing."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import UsageError
from ..config import DEFAULT_STRENGTH, MAX_LAYOUT_SEARCH, GenerationSettings
from ..config import GenerationSettings as S
from .jobs import Job, Stopped
from .limits import Limits, check_cost
from ..images import png_bytes
from ..layout import find_relation, look_ahead
from .media import data_url, decode_b64_image, latent_preview


def check_text(name: str, text: str, limits: Limits) -> str:
    if len(text) > limits.max_prompt:
        raise UsageError(f"{name} is {len(text)} characters long; the limit is {limits.max_prompt}")
    return text


def check_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


@dataclass
class GenSpec(GenerationSettings):
    """A checked generation request: the settings plus what else Pipeline.generate takes."""

    n: int = 1
    init_image: object = None
    mask: object = None
    explain: bool = False


def prepare(models, limits: Limits, prompt: str, negative: str = S.negative, seed: int = S.seed,
            steps: int | None = None, guidance: float | None = None, scheduler: str | None = None, width: int = S.width,
            height: int = S.height, n: int = 1, init_image: str | None = None, mask: str | None = None,
            strength: float = DEFAULT_STRENGTH, explain: bool = False, layout_search: int = S.layout_search,
            mean_prior: float | None = None) -> GenSpec:
    """Check a request against the server's limits and the model (Pipeline.check), decode its images.
    Steps, guidance, scheduler and mean prior not given are the model's own defaults (Pipeline.settings).

    Raises:
        UsageError: naming the field and the limit (the server answers 422)."""
    pipe = models.pipe
    if pipe is None:
        raise UsageError(f"{models.name} has no UNet: this server does search only")
    own = pipe.settings(prompt, steps=steps, guidance=guidance, scheduler=scheduler, mean_prior=mean_prior)
    steps, guidance, scheduler = own.steps, own.guidance, own.scheduler
    check_text("prompt", prompt, limits)
    check_text("negative prompt", negative, limits)
    check_range("steps", steps, 1, limits.max_steps)
    check_range("number of images", n, 1, limits.max_images)
    check_range("width", width, 0, limits.max_side)
    check_range("height", height, 0, limits.max_side)
    if seed == -1:  # AUTOMATIC1111: a random seed
        seed = random.randrange(2**32 - limits.max_images)
    check_range("seed", seed, 0, 2**32 - 1)
    if mask is not None and init_image is None:
        raise UsageError("a mask needs an init image")
    check_range("layout search", layout_search, 0, MAX_LAYOUT_SEARCH)
    if width % pipe.multiple == 0 and height % pipe.multiple == 0:  # else pipe.check names the rule
        check_cost(width or pipe.native, height or pipe.native, pipe.native, steps, n, limits)
        if layout_search > 1 and init_image is None and find_relation(pipe.tokenizer, prompt):
            # the look-ahead draws layout_search candidates at a time, once per image, for half the steps
            try:
                check_cost(width or pipe.native, height or pipe.native, pipe.native, look_ahead(steps) * n,
                           layout_search, limits)
            except UsageError as e:
                raise UsageError(f"layout search over {layout_search} noises: {e}") from None
    spec = GenSpec(prompt, negative, seed, steps, guidance, scheduler, width, height,
                   strength if init_image is not None else None, layout_search, own.mean_prior, n=n, explain=explain)
    if init_image is not None:
        spec.init_image = decode_b64_image(init_image, limits.max_pixels, "init image")
        if mask is not None:
            spec.mask = decode_b64_image(mask, limits.max_pixels, "mask")
    s = pipe.check(spec, n)
    spec.width, spec.height = s.width, s.height
    return spec


def stoppable_modules(pipe) -> list:
    """Every layer of the UNet and the VAE decoder: the units between two cancel checks. A sampler step
    runs hundreds of them and the VAE decode after the last step is as long as several steps, so a
    per-step check leaves a cancel waiting for seconds at large sizes; a check per layer costs about a
    microsecond."""
    parts = [u for u in (pipe.full_unet, pipe.fast_unet) if u is not None] + [pipe.vae.decoder]
    return [m for part in parts for m in part.modules()]


@contextmanager
def stoppable(pipe, job: Job):
    """Check `job` (cancel, time limit, server stopping) before every layer of stoppable_modules, with
    torch forward pre-hooks; removed on exit. Only the lane runs the pipeline, so hooks of one job never
    see another's work."""
    def hook(module, args):
        job.check()

    handles = [m.register_forward_pre_hook(hook) for m in stoppable_modules(pipe)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def generation(models, spec: GenSpec, limits: Limits):
    """The job body: generate with a step callback that reports progress and previews; the job stops
    within one UNet or VAE layer when it is cancelled, out of time or the server stops. Returns one
    dict per image."""
    pipe = models.pipe

    def run(job: Job) -> list[dict]:
        last: dict = {"at": 0.0}

        def callback(d: dict) -> None:
            last["latents"] = d["latents"]
            job.step, job.total = d["i"] + 1, d["total"]
            job.check()
            preview = None
            now = time.time()
            if now - last["at"] >= limits.preview_seconds or job.step == job.total:
                job.preview = latent_preview(pipe.vae, d["latents"])
                preview, last["at"] = data_url(job.preview), now
            job.emit("step", {"step": job.step, "total": job.total, "progress": round(job.progress, 4),
                              "preview": preview})

        try:
            with stoppable(pipe, job):
                result = pipe.generate(spec, n=spec.n, init_image=spec.init_image, mask=spec.mask,
                                       callback=callback, capture=spec.explain)
            images, maps = result if spec.explain else (result, None)
        except Stopped:
            # A client's cancel gets what the sampler had reached, as AUTOMATIC1111's interrupt returns
            # (one decode of the batch, which max_step_cost bounds); a timeout or a stopping server do not.
            if job.cancelled_by_client and "latents" in last:
                job.result = _partial(pipe, last["latents"], spec)
            raise
        out = []
        for i, img in enumerate(images):
            item = {"png": png_bytes(img), "parameters": img.info.get("parameters", ""), "seed": spec.seed + i}
            if spec.explain:
                item["words"] = _word_overlays(pipe, spec.prompt, img, maps[i])
            out.append(item)
        return out

    return run


def _partial(pipe, latents, spec: GenSpec) -> list[dict]:
    from PIL import Image

    from ..sampling import decode_latents

    pixels = decode_latents(pipe.vae, latents).numpy()
    return [{"png": png_bytes(Image.fromarray(a)), "parameters": "", "seed": spec.seed + i}
            for i, a in enumerate(pixels)]


def _word_overlays(pipe, prompt: str, img, token_maps) -> list[dict]:
    from ..explain import overlay, word_maps_from_tokens

    wm = word_maps_from_tokens(pipe.tokenizer, prompt, img, token_maps)
    return [{"word": w, "overlay": data_url(png_bytes(overlay(img, m)))} for w, m in zip(wm.words, wm.maps)]


def grounding(models, image, phrases: list[str]):
    """The job body of /v1/explain: where each phrase is in the image, and zero-shot odds."""

    def run(job: Job) -> dict:
        from ..explain import ground, overlay, zero_shot

        job.total = 1
        with stoppable(models.pipe, job):
            g = ground(models.pipe, image, phrases)
        job.step = 1
        probs = None
        if models.embedder is not None:
            with models.embed_lock:
                probs = [round(float(p), 6) for p in zero_shot(models.embedder, image, phrases)]
        return {"phrases": g.phrases, "peaks": [list(p) for p in g.peaks()], "probabilities": probs,
                "overlays": [data_url(png_bytes(overlay(image, m))) for m in g.maps]}

    return run
