"""AUTOMATIC1111-compatible endpoints under /sdapi/v1, so its API clients work unchanged.

Request fields and response shapes follow AUTOMATIC1111's API (base64 images, `parameters` echoing
the request, `info` as a JSON string). Fields sfumato has no use for (hires fix, face restoration,
scripts, ...) are accepted and ignored, as AUTOMATIC1111 ignores what a script does not read.
Generation runs on the same lane as /v1/generate; /interrupt cancels the running job.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from ..errors import UsageError
from ..config import DEFAULT_SCHEDULER, parse_parameters
from ..pipeline import SCHEDULERS
from .deps import Server, get_models, get_server, submit, wait_for
from .media import b64, decode_b64
from .models import Models
from .work import generation, prepare

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send many fields sfumato does not use

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # older clients
    width: Optional[int] = None  # None: the model's native size
    height: Optional[int] = None
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: Optional[float] = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = []
    mask: Optional[str] = None


class PngInfoRequest(BaseModel):
    image: str


def _sampler(req: Txt2ImgRequest) -> str:
    return req.sampler_name or req.sampler_index or DEFAULT_SCHEDULER


async def _run(req: Txt2ImgRequest, server: Server, models: Models, init: Optional[str] = None,
               mask: Optional[str] = None) -> dict:
    if req.batch_size < 1 or req.n_iter < 1:
        raise UsageError(f"batch_size and n_iter must be at least 1, got {req.batch_size} and {req.n_iter}")
    n = req.batch_size * req.n_iter  # image i uses seed + i, as AUTOMATIC1111's all_seeds
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    spec = prepare(models, server.limits, req.prompt, req.negative_prompt, req.seed, req.steps, req.cfg_scale,
                   _sampler(req), req.width or 0, req.height or 0, n, init, mask, strength)
    job = await wait_for(submit(server, "generate", generation(models, spec, server.limits), total=spec.steps))
    results = job.result or []  # interrupted: what the sampler had reached
    infotexts = [r["parameters"] for r in results]
    info = {"prompt": spec.prompt, "all_prompts": [spec.prompt] * len(results), "negative_prompt": spec.negative,
            "all_negative_prompts": [spec.negative] * len(results), "seed": spec.seed,
            "all_seeds": [r["seed"] for r in results], "subseed": -1, "all_subseeds": [-1] * len(results),
            "subseed_strength": 0, "width": spec.width, "height": spec.height, "sampler_name": spec.scheduler,
            "cfg_scale": spec.guidance, "steps": spec.steps, "batch_size": req.batch_size,
            "restore_faces": False, "sd_model_name": models.pipe.name, "sd_model_hash": models.pipe.hash,
            "denoising_strength": strength if init is not None else None, "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "interrupted": job.status == "cancelled"}
    params = req.model_dump()
    if init is not None:
        params.update(init_images=None, mask=None)  # as AUTOMATIC1111: the inputs are not echoed back
    return {"images": [b64(r["png"]) for r in results], "parameters": params, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(req: Txt2ImgRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    return await _run(req, server, models)


@router.post("/img2img")
async def img2img(req: Img2ImgRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    if len(req.init_images) != 1:
        raise UsageError(f"init_images must hold exactly one image, got {len(req.init_images)}")
    return await _run(req, server, models, req.init_images[0], req.mask)


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


@router.get("/samplers")
def samplers():
    return [{"name": name, "aliases": [cls], "options": {k: str(v) for k, v in kw.items()}}
            for name, (cls, kw) in SCHEDULERS.items()]


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
            "samples_format": "png", "live_previews_enable": True, "CLIP_stop_at_last_layers": 1,
            **server.options}


# Options a client may set; sfumato stores them and reports them back (its behaviour does not change).
SETTABLE = {"live_previews_enable": bool, "show_progress_every_n_steps": int, "show_progress_type": str,
            "sd_vae": str, "eta_noise_seed_delta": int}


@router.post("/options")
def set_options(body: dict[str, Any], server: Server = Depends(get_server), models: Models = Depends(get_models)):
    for key, value in body.items():
        if key == "sd_model_checkpoint":
            if value not in (_title(models), models.name, getattr(models.pipe, "hash", None)):
                raise UsageError(f"sd_model_checkpoint: only {_title(models)!r} is loaded "
                                 "(start the server with another --model to serve another)")
        elif key == "samples_format":
            if value != "png":
                raise UsageError(f"samples_format: only 'png' is written, got {value!r}")
        elif key == "CLIP_stop_at_last_layers":
            if value != 1:
                raise UsageError(f"CLIP_stop_at_last_layers: only 1 is supported, got {value!r}")
        elif key in SETTABLE:
            if not isinstance(value, SETTABLE[key]):
                raise UsageError(f"{key} must be a {SETTABLE[key].__name__}, got {value!r}")
            server.options[key] = value
        else:
            raise UsageError(f"unknown option {key!r}; settable: sd_model_checkpoint, samples_format, "
                             f"CLIP_stop_at_last_layers, {', '.join(SETTABLE)}")
    return None


@router.post("/png-info")
def png_info(req: PngInfoRequest, server: Server = Depends(get_server)):
    """The generation parameters stored in a PNG (sfumato or AUTOMATIC1111)."""
    import io

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
