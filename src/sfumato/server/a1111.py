"""AUTOMATIC1111-compatible endpoints under /sdapi/v1, so its API clients work unchanged.

Request fields and response shapes follow AUTOMATIC1111's API (base64 images, `parameters` echoing
the request, `info` as a JSON string). Each field AUTOMATIC1111 documents is honoured, or refused
with 422 naming it when it would change the result in a way sfumato cannot; values that change
nothing (the defaults clients send) pass. Fields AUTOMATIC1111 does not have are refused too, so a
misspelt field never falls back to a default unnoticed.

Generation runs on the same lane as /v1/generate; /interrupt cancels the running job, and so does a
client that hangs up while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from ..config import DEFAULT_SCHEDULER, DEFAULT_STRENGTH, GenerationSettings, parse_parameters
from ..errors import UsageError
from ..pipeline import SCHEDULERS
from .deps import Server, get_models, get_server, submit, wait_for
from .inpaint import Inpaint, png_with_parameters
from .jobs import Job, Stopped
from .limits import check_passes
from .media import b64, decode_b64
from .models import Models
from .work import GenSpec, check_range, generation, prepare

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])


class A1111Request(BaseModel):
    """The fields txt2img and img2img share. Optional ones default to "changes nothing"."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    seed_enable_extras: Optional[bool] = True
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # older clients
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = None  # None: the model's own steps, guidance and sampler (GET /v1/models)
    cfg_scale: Optional[float] = None
    width: Optional[int] = None  # None or 0: the model's native size
    height: Optional[int] = None
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    token_merging_ratio: Optional[float] = None
    token_merging_ratio_hr: Optional[float] = None
    infotext: Optional[str] = None
    force_task_id: Optional[str] = None
    user: Optional[str] = None
    script_name: Optional[str] = None
    script_args: Optional[list] = None
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = None


class Txt2ImgRequest(A1111Request):
    enable_hr: Optional[bool] = False
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(A1111Request):
    init_images: Optional[list[str]] = None
    resize_mode: Optional[int] = 0
    image_cfg_scale: Optional[float] = None  # instruct-pix2pix models only; sfumato's are not
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = None
    mask_blur_y: Optional[int] = None
    mask_blur: Optional[int] = None  # sfumato's default is 0: unmasked pixels are kept exactly
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = None  # None: 1, the original picture under the mask
    inpaint_full_res: Optional[bool] = None  # None: the whole picture
    inpaint_full_res_padding: Optional[int] = 32
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = False


class PngInfoRequest(BaseModel):
    image: str


# ---------------------------------------------------------------- samplers and schedule types

# AUTOMATIC1111's schedule types (its /schedulers names and labels). sfumato offers "Automatic" (each
# sampler's own), "Uniform" (the same, for samplers whose own schedule is uniform) and each type some
# sampler has a variant for in pipeline.SCHEDULERS, named "SAMPLER LABEL" ("DPM++ 2M Karras").
SCHEDULE_TYPES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                  "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                  "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                  "beta": "Beta"}
_VARIANTS = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple",
             "Normal", "Beta")
_SAME = ("", "use same sampler", "use same scheduler", "use same checkpoint")
# eta of the samplers that have one: a request may only ask for the eta each runs at.
FIXED_ETA = {"Euler a": 1.0, "DDIM": 0.0, "DDPM": 1.0}


def _variant(sampler: str) -> tuple[str, Optional[str]]:
    """("DPM++ 2M", "Karras") for "DPM++ 2M Karras"; (name, None) for a plain sampler."""
    for label in _VARIANTS:
        if sampler.endswith(" " + label):
            return sampler[:-len(label) - 1], label
    return sampler, None


def offered_schedules() -> list[str]:
    labels = ["Automatic", "Uniform"]
    return labels + [v for v in _VARIANTS if any(_variant(s)[1] == v for s in SCHEDULERS)]


def resolve_sampler(sampler: Optional[str], schedule: Optional[str], field: str = "scheduler") -> str:
    """The pipeline.SCHEDULERS name for an AUTOMATIC1111 sampler and schedule type.

    A schedule in the sampler's name ("DPM++ 2M Karras") is read as AUTOMATIC1111 reads it."""
    name = sampler or DEFAULT_SCHEDULER
    if not schedule or schedule.strip().lower() in ("automatic", "use same scheduler"):
        return name
    key = schedule.strip().lower()
    label = SCHEDULE_TYPES.get(key) or next((v for v in SCHEDULE_TYPES.values() if v.lower() == key), None)
    offered = offered_schedules()
    if label not in offered:
        raise UsageError(f"{field} {schedule!r} is not available; choose from {', '.join(offered)}")
    base, own = _variant(name)
    if base not in SCHEDULERS and name not in SCHEDULERS:
        return name  # the pipeline names the unknown sampler
    if own is not None:
        if own != label:
            raise UsageError(f"{field} {schedule!r} contradicts sampler {name!r}; send sampler {base!r} "
                             f"with {field} {schedule!r}, or {field} 'Automatic'")
        return name
    if label == "Uniform":
        return name
    if f"{name} {label}" not in SCHEDULERS:
        with_it = [_variant(s)[0] for s in SCHEDULERS if _variant(s)[1] == label]
        raise UsageError(f"{field} {schedule!r} is available with sampler {', '.join(with_it)}, not with {name!r}")
    return f"{name} {label}"


# ---------------------------------------------------------------- what sfumato cannot do


def _refuse(field: str, why: str) -> None:
    raise UsageError(f"{field}: {why}")


def check_option(key: str, value: Any, models: Models, name: Optional[str] = None) -> None:
    """Refuse an option (/options, override_settings) whose value would change what sfumato does;
    errors call it `name` (default: key)."""
    name = name or key
    if key == "sd_model_checkpoint":
        if value not in (_title(models), models.name, getattr(models.pipe, "hash", None)):
            _refuse(name, f"only {_title(models)!r} is loaded (start the server with another --model to serve another)")
    elif key == "samples_format":
        if value != "png":
            _refuse(name, f"only 'png' is written, got {value!r}")
    elif key == "CLIP_stop_at_last_layers":
        if value != 1:
            _refuse(name, f"only 1 is supported, got {value!r}")
    elif key == "sd_vae":
        if value not in (None, "Automatic", "None"):
            _refuse(name, f"only the model's own VAE ('Automatic') is available, got {value!r}")
    elif key == "eta_noise_seed_delta":
        if value != 0:
            _refuse(name, f"only 0 is supported, got {value!r}")
    elif key in UI_OPTIONS:
        if not isinstance(value, UI_OPTIONS[key]):
            _refuse(name, f"must be a {UI_OPTIONS[key].__name__}, got {value!r}")
    else:
        raise UsageError(f"unknown option {name!r}; sfumato takes {', '.join(OPTIONS)}")


def _check_fields(req: A1111Request, sampler: str, models: Models) -> None:
    """422 naming the first field whose value sfumato cannot honour."""
    if req.styles:
        _refuse("styles", "sfumato has no saved styles; put the words in the prompt")
    if req.subseed_strength:
        _refuse("subseed_strength", "variation seeds are not supported; send 0")
    for f in ("seed_resize_from_h", "seed_resize_from_w"):
        if (getattr(req, f) or 0) > 0:
            _refuse(f, "resizing from a seed is not supported; send -1")
    if req.restore_faces:
        _refuse("restore_faces", "sfumato has no face restoration")
    if req.tiling:
        _refuse("tiling", "tiling images are not supported")
    base = _variant(sampler)[0]
    if req.eta is not None and base in FIXED_ETA and req.eta != FIXED_ETA[base]:
        _refuse("eta", f"sampler {sampler} runs at eta {FIXED_ETA[base]:g} only, got {req.eta:g}")
    if req.s_min_uncond:
        _refuse("s_min_uncond", "skipping the negative prompt at low sigmas is not supported; send 0")
    if req.s_churn:
        _refuse("s_churn", "sigma churn is not supported; send 0")  # s_tmin, s_tmax bound the churn only
    if req.s_noise is not None and req.s_noise != 1:
        _refuse("s_noise", f"only 1 is supported, got {req.s_noise:g}")
    for key, value in (req.override_settings or {}).items():
        check_option(key, value, models, f"override_settings.{key}")
    if req.refiner_checkpoint not in (None, "", "None"):
        _refuse("refiner_checkpoint", "sfumato has no refiner")
    if req.firstpass_image:
        _refuse("firstpass_image", "not supported; send the image to /sdapi/v1/img2img")
    for f in ("token_merging_ratio", "token_merging_ratio_hr"):
        if getattr(req, f):
            _refuse(f, "token merging is not supported; send 0")
    if req.infotext:
        _refuse("infotext", "send the parameters as fields (POST /sdapi/v1/png-info parses an infotext)")
    if req.script_name:
        _refuse("script_name", "sfumato runs no scripts")
    if req.script_args:
        _refuse("script_args", "sfumato runs no scripts")
    if req.alwayson_scripts:
        _refuse("alwayson_scripts", f"sfumato runs no scripts, got {', '.join(req.alwayson_scripts)}")
    if req.save_images:
        _refuse("save_images", "this server keeps no files; the images come back in the answer")


class _Pass:
    """One pass of a two-pass job: reports its steps as part of the whole job's."""

    def __init__(self, job: Job, done: int, after: int):
        self._job, self._done, self._after = job, done, after

    step = property(lambda self: self._job.step, lambda self, v: setattr(self._job, "step", self._done + v))
    total = property(lambda self: self._job.total,
                     lambda self, v: setattr(self._job, "total", self._done + v + self._after))
    preview = property(lambda self: self._job.preview, lambda self, v: setattr(self._job, "preview", v))
    progress = property(lambda self: self._job.progress)

    def __getattr__(self, name: str):  # the rest (check, emit, cancel state) is the job's own
        return getattr(self._job, name)


# ---------------------------------------------------------------- hires fix


UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST", "None": "LANCZOS"}


@dataclasses.dataclass
class Hires:
    """The second pass of AUTOMATIC1111's hires fix: each image upscaled in pixels, then img2img."""

    spec: GenSpec  # size, steps, sampler, prompts and strength of the second pass
    upscaler: str
    crop: tuple[int, int]  # the size the upscale covers before its middle is cut to spec's size
    extra: dict


def _hires(req: Txt2ImgRequest, first: GenSpec, sampler: str, models: Models, server: Server) -> Hires:
    pipe, limits = models.pipe, server.limits
    upscaler = "Lanczos" if req.hr_upscaler in (None, "") else req.hr_upscaler
    if upscaler not in UPSCALERS:
        _refuse("hr_upscaler", f"{upscaler!r} is not available (sfumato upscales in pixels before the second "
                f"pass); choose from {', '.join(UPSCALERS)}")
    if (req.hr_checkpoint_name or "").lower() not in _SAME:
        check_option("sd_model_checkpoint", req.hr_checkpoint_name, models, "hr_checkpoint_name")
    w, h = first.width, first.height
    rx, ry = req.hr_resize_x or 0, req.hr_resize_y or 0
    extra: dict = {}
    if rx <= 0 and ry <= 0:  # AUTOMATIC1111's target size rule
        scale = 2.0 if req.hr_scale is None else req.hr_scale
        check_range("hr_scale", scale, 1, limits.max_side / max(w, h))
        tw, th = int(w * scale), int(h * scale)
        cw, ch = tw, th
        extra["Hires upscale"] = f"{scale:g}"
    else:
        if rx <= 0:
            tw, th = ry * w // h, ry
        elif ry <= 0:
            tw, th = rx, rx * h // w
        else:
            tw, th = rx, ry
        cw, ch = (tw, tw * h // w) if w / h < tw / th else (th * w // h, th)  # cover, then crop the middle
        extra["Hires resize"] = f"{rx}x{ry}"
    for name, side in (("hires width", tw), ("hires height", th)):
        if side % pipe.multiple or not pipe.multiple <= side <= limits.max_side:
            raise UsageError(f"{name} {side} (from hr_scale or hr_resize_x/y) must be a multiple of {pipe.multiple} "
                             f"between {pipe.multiple} and {limits.max_side}")
    strength = DEFAULT_STRENGTH if req.denoising_strength is None else req.denoising_strength
    check_range("denoising_strength", strength, 0, 1)
    steps = req.hr_second_pass_steps or first.steps
    hr_sampler = sampler
    if (req.hr_sampler_name or "").lower() not in _SAME or (req.hr_scheduler or "").lower() not in _SAME:
        name = req.hr_sampler_name if (req.hr_sampler_name or "").lower() not in _SAME else _variant(sampler)[0]
        sched = req.hr_scheduler if (req.hr_scheduler or "").lower() not in _SAME else _variant(sampler)[1]
        hr_sampler = resolve_sampler(name, sched, "hr_scheduler")
    prompt = req.hr_prompt or first.prompt
    negative = req.hr_negative_prompt or first.negative
    spec = prepare(models, limits, prompt, negative, first.seed, steps, first.guidance, hr_sampler, tw, th, 1)
    spec.strength = strength
    # prepare() checked each pass alone (the second per image); the cap is on the whole job
    check_passes([("first pass", first.width, first.height, first.steps, first.n),
                  ("hires pass", tw, th, _hires_steps(spec), first.n)], pipe.native, limits)
    extra.update({"Hires steps": steps, "Hires upscaler": upscaler, "Denoising strength": f"{strength:g}"})
    if hr_sampler != sampler:
        extra["Hires sampler"] = hr_sampler
    if prompt != first.prompt:
        extra["Hires prompt"] = json.dumps(prompt)
    if negative != first.negative:
        extra["Hires negative prompt"] = json.dumps(negative)
    return Hires(spec, upscaler, (cw, ch), extra)


def _hires_steps(spec: GenSpec) -> int:
    """Sampler steps the second pass runs per image: img2img skips the first (1 - strength) of them."""
    return max(1, min(round(spec.steps * spec.strength), spec.steps))


def hires_job(models: Models, first: GenSpec, hr: Hires, server: Server):
    """The job body: the first pass, then for each image its upscale and second pass (seed + i)."""
    from PIL import Image

    pipe = models.pipe
    per_image = _hires_steps(hr.spec)

    def run(job: Job) -> list[dict]:
        step = _Pass(job, 0, first.n * per_image)
        try:
            base = generation(models, first, server.limits)(step)
        except Stopped:
            job.result = getattr(step, "result", None)
            raise
        done, out = job.step, []
        for i, item in enumerate(base):
            img = Image.open(io.BytesIO(item["png"])).convert("RGB")
            up = img.resize(hr.crop, getattr(Image, UPSCALERS[hr.upscaler]))
            tw, th = hr.spec.width, hr.spec.height
            left, top = (hr.crop[0] - tw) // 2, (hr.crop[1] - th) // 2
            spec = dataclasses.replace(hr.spec, seed=first.seed + i, init_image=up.crop((left, top, left + tw, top + th)))
            step = _Pass(job, done, (first.n - i - 1) * per_image)
            try:
                second = generation(models, spec, server.limits)(step)[0]
            except Stopped:  # what was finished, and the image the sampler was on
                job.result = out + (getattr(step, "result", None) or [])
                raise
            done = job.step
            # AUTOMATIC1111's infotext of a hires image: the first pass's settings and the hires ones
            text = GenerationSettings.parameters(
                dataclasses.replace(first, seed=first.seed + i, extra={**first.extra, **hr.extra}), pipe.name, pipe.hash)
            out.append({**second, "parameters": text, "png": png_with_parameters(Image.open(io.BytesIO(second["png"])), text)})
        return out

    return run, first.steps + first.n * per_image


# ---------------------------------------------------------------- txt2img and img2img


async def _wait(job: Job, request: Request, server: Server) -> Job:
    """Wait for the job; cancel it when the client hangs up (nobody would read the answer)."""
    done = asyncio.wrap_future(job.finished_future)
    while not done.done():
        await asyncio.wait([done], timeout=0.25)
        if not done.done() and await request.is_disconnected():
            server.queue.cancel(job)
            break
    return await wait_for(job)


async def _run(req: A1111Request, request: Request, server: Server, models: Models) -> dict:
    img2img = isinstance(req, Img2ImgRequest)
    batch, n_iter = (1 if v is None else v for v in (req.batch_size, req.n_iter))
    if batch < 1 or n_iter < 1:
        raise UsageError(f"batch_size and n_iter must be at least 1, got {batch} and {n_iter}")
    n = batch * n_iter  # image i uses seed + i, as AUTOMATIC1111's all_seeds
    own = models.pipe.defaults.get("scheduler") if models.pipe is not None else None
    sampler = resolve_sampler(req.sampler_name or req.sampler_index or own, req.scheduler)
    _check_fields(req, sampler, models)
    init = mask = inpaint = hr = None
    if img2img:
        init, mask, inpaint = _img2img_fields(req)
    else:
        for f in ("firstphase_width", "firstphase_height"):
            if getattr(req, f):
                _refuse(f, "the old hires-fix sizes are not supported; send width, height and hr_scale or hr_resize_x/y")
    strength = DEFAULT_STRENGTH if req.denoising_strength is None else req.denoising_strength
    spec = prepare(models, server.limits, req.prompt or "", req.negative_prompt or "",
                   -1 if req.seed is None else req.seed, req.steps, req.cfg_scale, sampler, req.width or 0,
                   req.height or 0, n, init, mask, strength)
    warnings = []
    native = models.pipe.native
    if (spec.width, spec.height) != (native, native):
        warnings.append(f"{spec.width}x{spec.height} is not the model's native size {native}x{native}: it draws "
                        f"best and fastest at {native}x{native} (send width and height {native}, or 0)")
    if inpaint is not None:
        body, total = _img2img_job(models, spec, inpaint, server), spec.steps
    elif isinstance(req, Txt2ImgRequest) and req.enable_hr:
        hr = _hires(req, spec, sampler, models, server)
        body, total = hires_job(models, spec, hr, server)
    else:
        body, total = generation(models, spec, server.limits), spec.steps
    job = await _wait(submit(server, "generate", body, total=total), request, server)
    results = job.result or []  # interrupted: what the sampler had reached
    infotexts = [r["parameters"] for r in results]
    extra = {k: v for k, v in spec.extra.items()}
    if hr is not None:
        extra.update(hr.extra)
    info = {"prompt": spec.prompt, "all_prompts": [spec.prompt] * len(results), "negative_prompt": spec.negative,
            "all_negative_prompts": [spec.negative] * len(results), "seed": spec.seed,
            "all_seeds": [r["seed"] for r in results], "subseed": -1, "all_subseeds": [-1] * len(results),
            "subseed_strength": 0, "width": spec.width, "height": spec.height, "sampler_name": spec.scheduler,
            "cfg_scale": spec.guidance, "steps": spec.steps, "batch_size": batch,
            "restore_faces": False, "sd_model_name": models.pipe.name, "sd_model_hash": models.pipe.hash,
            "denoising_strength": strength if init is not None or hr is not None else None,
            "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "clip_skip": 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "interrupted": job.status == "cancelled", "warnings": warnings}
    params = req.model_dump()
    if img2img:
        params.update(init_images=None, mask=None)  # as AUTOMATIC1111: the inputs are not echoed back
    images = [b64(r["png"]) for r in results] if req.send_images is not False else []
    return {"images": images, "parameters": params, "info": json.dumps(info)}


def _img2img_fields(req: Img2ImgRequest) -> tuple[str, Optional[str], Inpaint]:
    if len(req.init_images or []) != 1:
        raise UsageError(f"init_images must hold exactly one image, got {len(req.init_images or [])}")
    if req.resize_mode not in (None, 0, 1, 2):
        _refuse("resize_mode", f"0 (just resize), 1 (crop and resize) or 2 (resize and fill), got {req.resize_mode}")
    if req.initial_noise_multiplier not in (None, 1):
        _refuse("initial_noise_multiplier", f"only 1 is supported, got {req.initial_noise_multiplier:g}")
    if req.latent_mask:
        _refuse("latent_mask", "a separate latent mask is not supported")
    inpaint = Inpaint(resize_mode=req.resize_mode or 0)
    if req.mask:
        blur = req.mask_blur or 0
        bx = blur if req.mask_blur_x is None or req.mask_blur is not None else req.mask_blur_x
        by = blur if req.mask_blur_y is None or req.mask_blur is not None else req.mask_blur_y
        for name, v in (("mask_blur", bx), ("mask_blur", by)):
            check_range(name, v, 0, 64)
        if req.mask_round is False:
            _refuse("mask_round", "the latent mask is always rounded; send true")
        if req.inpainting_fill not in (None, 0, 1):
            _refuse("inpainting_fill", f"0 (fill) or 1 (original) only, got {req.inpainting_fill}")
        if req.inpainting_mask_invert not in (None, 0, 1):
            _refuse("inpainting_mask_invert", f"0 or 1, got {req.inpainting_mask_invert}")
        if req.inpaint_full_res and req.resize_mode:
            _refuse("resize_mode", "with inpaint_full_res (only masked) only 0 applies")
        padding = 32 if req.inpaint_full_res_padding is None else req.inpaint_full_res_padding
        check_range("inpaint_full_res_padding", padding, 0, 256)
        inpaint = dataclasses.replace(inpaint, blur=(bx, by), invert=bool(req.inpainting_mask_invert),
                                      fill=req.inpainting_fill == 0, only_masked=bool(req.inpaint_full_res),
                                      padding=padding)
    return req.init_images[0], req.mask, inpaint


def _img2img_job(models: Models, spec: GenSpec, inpaint: Inpaint, server: Server):
    """The job body: fit the images (on the lane: blurs of big images take a while), generate, composite."""
    extra = {}
    if spec.mask is not None:
        if inpaint.blur != (0, 0):
            extra["Mask blur"] = inpaint.blur[0] if inpaint.blur[0] == inpaint.blur[1] else f"{inpaint.blur}"
        if inpaint.invert:
            extra["Mask mode"] = "Inpaint not masked"
        extra["Masked content"] = "fill" if inpaint.fill else "original"
        if inpaint.only_masked:
            extra.update({"Inpaint area": "Only masked", "Masked area padding": inpaint.padding})
    if inpaint.resize_mode:
        extra["Resize mode"] = ("Just resize", "Crop and resize", "Resize and fill")[inpaint.resize_mode]
    spec.extra = {**spec.extra, **extra}
    run = generation(models, spec, server.limits)

    def body(job: Job) -> list[dict]:
        state = inpaint.prepare(spec)
        return [inpaint.finish(item, state) for item in run(job)]

    return body


@router.post("/txt2img")
async def txt2img(req: Txt2ImgRequest, request: Request, server: Server = Depends(get_server),
                  models: Models = Depends(get_models)):
    return await _run(req, request, server, models)


@router.post("/img2img")
async def img2img(req: Img2ImgRequest, request: Request, server: Server = Depends(get_server),
                  models: Models = Depends(get_models)):
    return await _run(req, request, server, models)


# ---------------------------------------------------------------- the rest of the API


@router.get("/progress")
def progress(skip_current_image: bool = False, server: Server = Depends(get_server)):
    job = server.queue.current
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": server.queue.pending(),
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    elapsed = time.time() - (job.started or time.time())
    p = job.progress
    state.update(job=job.id, interrupted=job.cancel_flag.is_set(), sampling_step=job.step,
                 sampling_steps=job.total, job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)))
    image = None if skip_current_image or job.preview is None else b64(job.preview)
    return {"progress": round(p, 4), "eta_relative": round(elapsed / p - elapsed, 2) if p > 0 else 0.0,
            "state": state, "current_image": image, "textinfo": None}


@router.post("/interrupt")
def interrupt(server: Server = Depends(get_server)):
    """Cancel the running job (waiting jobs go on)."""
    job = server.queue.current
    if job is not None:
        server.queue.cancel(job)
    return {}


@router.post("/skip")
def skip(server: Server = Depends(get_server)):
    return interrupt(server)


@router.get("/scripts")
def scripts():
    """None: sfumato runs no scripts (webuiapi asks on connecting which extensions it may use)."""
    return {"txt2img": [], "img2img": []}


@router.get("/samplers")
def samplers():
    return [{"name": name, "aliases": [cls], "options": {k: str(v) for k, v in kw.items()}}
            for name, (cls, kw) in SCHEDULERS.items()]


@router.get("/schedulers")
def schedulers():
    """The schedule types sfumato offers (send one as `scheduler`; GET /samplers for the samplers)."""
    names = {label: name for name, label in SCHEDULE_TYPES.items()}
    rho = {"Karras": 7.0}
    return [{"name": names[label], "label": label, "aliases": None, "default_rho": rho.get(label, -1),
             "need_inner_model": False} for label in offered_schedules()]


def _title(models: Models) -> str:
    return f"{models.name} [{models.pipe.hash}]" if models.pipe is not None else models.name


@router.get("/sd-models")
def sd_models(models: Models = Depends(get_models)):
    h = models.pipe.hash if models.pipe is not None else None
    return [{"title": _title(models), "model_name": models.name, "hash": h, "sha256": None,
             "filename": models.name, "config": None}]


@router.get("/options")
def get_options(server: Server = Depends(get_server), models: Models = Depends(get_models)):
    return {"sd_model_checkpoint": _title(models), "sd_checkpoint_hash": models.pipe.hash if models.pipe else None,
            "samples_format": "png", "live_previews_enable": True, "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
            "eta_noise_seed_delta": 0, **server.options}


# Options that only change how progress is shown: stored and reported back.
UI_OPTIONS = {"live_previews_enable": bool, "show_progress_every_n_steps": int, "show_progress_type": str}
OPTIONS = ("sd_model_checkpoint", "samples_format", "CLIP_stop_at_last_layers", "sd_vae", "eta_noise_seed_delta",
           *UI_OPTIONS)


@router.post("/options")
def set_options(body: dict[str, Any], server: Server = Depends(get_server), models: Models = Depends(get_models)):
    for key, value in body.items():
        check_option(key, value, models)
    server.options.update({k: v for k, v in body.items() if k in UI_OPTIONS})
    return None


@router.post("/png-info")
def png_info(req: PngInfoRequest, server: Server = Depends(get_server)):
    """The generation parameters stored in a PNG (sfumato or AUTOMATIC1111)."""
    from PIL import Image

    data = decode_b64(req.image, "image")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")) as im:
            w, h = im.size
            if w * h > server.limits.max_pixels:
                raise UsageError(f"image: {w}x{h} = {w * h:,} pixels, over the cap of {server.limits.max_pixels:,}")
            items = {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"image: unreadable ({e})") from None
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}
