"""The native API under /v1: generation jobs (status, server-sent events, cancel), search, classify,
explain, and adding images to an index."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional, Union

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UsageError
from ..config import DEFAULT_STRENGTH
from ..config import GenerationSettings as S
from .deps import Server, get_models, get_server, submit, wait_for
from .jobs import Job
from .media import data_url, decode_b64_image
from .models import IndexHandle, Models
from .work import check_range, check_text, generation, grounding, prepare

router = APIRouter(prefix="/v1", tags=["native"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default


class GenerateRequest(Strict):
    prompt: str
    negative: str = S.negative
    seed: int = Field(S.seed, description="Seed of the first image; image i uses seed + i; -1: random.")
    steps: Optional[int] = Field(None, description="Sampler steps; default: the model's own (GET /v1/models).")
    guidance: Optional[float] = Field(None, description="Guidance scale; default: the model's own.")
    scheduler: Optional[str] = Field(None, description="Sampler (GET /v1/schedulers); default: the model's own.")
    width: int = Field(S.width, description="Pixels; 0: the model's native size.")
    height: int = S.height
    n: int = 1
    init_image: Optional[str] = Field(None, description="Base64 PNG/JPEG/WebP for img2img.")
    mask: Optional[str] = Field(None, description="Base64 inpainting mask (white = repaint).")
    strength: float = DEFAULT_STRENGTH
    explain: bool = Field(False, description="Also return a heat map per word of the prompt.")
    layout_search: int = Field(S.layout_search, description="Candidate noises for a prompt that names a spatial "
                               "relation ('A left of B'); the one whose layout follows it is drawn; 0: off.")
    mean_prior: Optional[float] = Field(None, description="Gain of the model's mean prior on the few-step "
                                        "sampler's first estimate; default: the model's own; 0: off.")


class SearchRequest(Strict):
    index: Optional[str] = Field(None, description="Index name (GET /v1/indexes); default: the first.")
    text: Optional[str] = None
    image: Optional[str] = Field(None, description="Base64 image; with text: this image, changed by the words.")
    embedding: Optional[list[float]] = None
    k: int = 10
    alpha: Optional[float] = None
    method: Optional[str] = None
    images: bool = Field(False, description="Return each hit's image as a PNG data URL.")


class ClassifyRequest(Strict):
    images: list[str]
    labels: Union[list[str], str]
    templates: Optional[list[str]] = None


class ExplainRequest(Strict):
    image: str
    phrases: list[str]


class AddItem(Strict):
    image: str
    caption: Optional[str] = None


class AddRequest(Strict):
    images: list[AddItem]


# ---------------------------------------------------------------- jobs


@router.post("/generate", status_code=202)
def generate(req: GenerateRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    """Queue a generation; returns the job id at once (429 when the queue is full)."""
    spec = prepare(models, server.limits, **req.model_dump())
    job = submit(server, "generate", generation(models, spec, server.limits), total=spec.steps)
    return {"id": job.id, "status": job.status, "url": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}


@router.get("/models")
def list_models(models: Models = Depends(get_models)):
    """The model this server draws with: its native size and generation defaults ("defaults": what a
    request without steps, guidance or scheduler gets; "full_defaults": the same with any sampler but
    the few-step ones, for a model that carries a distilled UNet), the samplers it can run and which of
    them are few-step ones (run on the distilled UNet)."""
    from ..config import DEFAULT_SCHEDULER
    from ..pipeline import DISTILLED_ONLY, SCHEDULERS

    pipe = models.pipe
    if pipe is None:
        return [{"name": models.name, "generates": False}]

    def fields(s):
        return {"steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler}

    samplers = [name for name in SCHEDULERS
                if (pipe.fast_unet if name in DISTILLED_ONLY else pipe.full_unet) is not None]
    full = pipe.full_defaults.get("scheduler", DEFAULT_SCHEDULER)
    return [{"name": pipe.name, "hash": pipe.hash, "generates": True, "native": pipe.native,
             "multiple": pipe.multiple, "samplers": samplers,
             "few_step_samplers": [n for n in samplers if n in DISTILLED_ONLY],
             "defaults": fields(pipe.settings("")),
             "full_defaults": fields(pipe.settings("", scheduler=full)) if pipe.full_unet is not None else None}]


def job_json(job: Job, server: Server, images: bool = False) -> dict:
    out = {"id": job.id, "kind": job.kind, "status": job.status, "progress": round(job.progress, 4),
           "step": job.step, "total": job.total, "queue_position": server.queue.position(job),
           "preview": data_url(job.preview) if job.preview else None, "error": job.error,
           "created": job.created, "started": job.started, "finished": job.finished}
    if job.kind == "generate" and isinstance(job.result, list):
        out["images"] = [{"url": f"/v1/jobs/{job.id}/images/{i}", "seed": r["seed"], "parameters": r["parameters"],
                          **({"data": data_url(r["png"])} if images else {}),
                          **({"words": r["words"]} if images and "words" in r else {})}
                         for i, r in enumerate(job.result)]
    return out


def find_job(server: Server, job_id: str) -> Job:
    job = server.queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for the last {server.limits.keep_jobs})")
    return job


@router.get("/jobs/{job_id}")
def get_job(job_id: str, images: bool = False, server: Server = Depends(get_server)):
    """Status, progress, the latest preview; images (as URLs, or data with ?images=true) once done."""
    return job_json(find_job(server, job_id), server, images)


@router.get("/jobs/{job_id}/images/{k}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def get_image(job_id: str, k: int, server: Server = Depends(get_server)):
    """One image of a finished job, as PNG with its `parameters` chunk."""
    job = find_job(server, job_id)
    if not isinstance(job.result, list) or not 0 <= k < len(job.result):
        raise HTTPException(404, f"job {job_id} has no image {k}")
    return Response(job.result[k]["png"], media_type="image/png")


@router.delete("/jobs/{job_id}")
def cancel_job(job_id: str, server: Server = Depends(get_server)):
    """Cancel this job only: a waiting job at once, a running one within one sampler step."""
    job = find_job(server, job_id)
    if not job.done.is_set():
        server.queue.cancel(job)
    return job_json(job, server)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, server: Server = Depends(get_server)):
    """Server-sent events: queued, step (progress and a preview), then done or failed."""
    job = find_job(server, job_id)

    async def stream():
        i, beat = 0, time.time()
        while True:
            events = job.events[i:]
            for name, data in events:
                if name in ("done", "failed"):
                    data = job_json(job, server, images=True)
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
            i += len(events)
            if job.done.is_set() and i >= len(job.events):
                return
            if await request.is_disconnected():
                return
            if time.time() - beat > 15:  # keeps proxies from closing an idle stream
                beat = time.time()
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- explain (on the lane), search, classify


@router.post("/explain")
async def explain(req: ExplainRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    """Where is each phrase in the image: one heat map per phrase (and zero-shot odds with a CLIP)."""
    if models.pipe is None:
        raise UsageError(f"{models.name} has no UNet: explain needs one")
    if not 1 <= len(req.phrases) <= 16:
        raise UsageError(f"give between 1 and 16 phrases, got {len(req.phrases)}")
    for p in req.phrases:
        check_text("phrase", p, server.limits)
    image = decode_b64_image(req.image, server.limits.max_pixels)
    from ..explain import check_phrase

    for p in req.phrases:
        check_phrase(models.pipe.tokenizer, p)
    job = await wait_for(submit(server, "explain", grounding(models, image, req.phrases)))
    if job.status == "cancelled":
        raise HTTPException(409, "the job was cancelled")
    return job.result


@router.get("/indexes")
def list_indexes(models: Models = Depends(get_models)):
    return [{"name": h.name, "count": len(h.snapshot), "kind": h.snapshot.manifest["kind"],
             "version": h.snapshot.manifest["version"]} for h in models.indexes.values()]


def find_index(models: Models, name: Optional[str]) -> IndexHandle:
    if not models.indexes:
        raise HTTPException(404, "this server has no index (start it with --index DIR)")
    if name is None:
        return next(iter(models.indexes.values()))
    if name not in models.indexes:
        raise HTTPException(404, f"no index named {name!r}; choose from {', '.join(models.indexes)}")
    return models.indexes[name]


def hit_json(h, index: IndexHandle, with_image: bool) -> dict:
    out = {"id": h.id, "score": round(h.score, 6), "caption": h.caption, "url": f"/v1/index/{index.name}/images/{h.id}"}
    if with_image:
        out["image"] = data_url(read_indexed(h.path))
    return out


def read_indexed(path: str) -> bytes:
    """An indexed image as PNG bytes (a missing file becomes a grey square, as hits_grid draws it)."""
    from PIL import Image

    from ..errors import SfumatoError
    from ..pairs import open_image
    from ..images import png_bytes

    try:
        img = open_image(path)
    except SfumatoError:
        img = Image.new("RGB", (64, 64), (160, 160, 160))
    img.thumbnail((256, 256))
    return png_bytes(img)


@router.post("/search")
def search(req: SearchRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    """Nearest indexed images to words, an image, an image plus words, or an embedding."""
    from ..search import Query, check_model, search as knn

    limits = server.limits
    index = find_index(models, req.index)
    check_range("k", req.k, 1, limits.max_k)
    q = Query(req.text, req.image, req.embedding, req.alpha, req.method).validate(flag="")
    snap = index.snapshot
    if q.needs_model:
        check_text("text", req.text or "", limits)
        if req.image is not None:
            q.image = decode_b64_image(req.image, limits.max_pixels)
        check_model(snap.manifest, models.embedder, index.path)
    query = embed_query(q, models)
    hits = knn(snap, query, req.k)
    return {"index": index.name, "hits": [hit_json(h, index, req.images) for h in hits]}


def embed_query(q, models: Models):
    """A checked search.Query as a vector: words alone share batched passes of the text tower
    (Models.text_vector); image queries take the tower's lock."""
    if q.image is None:
        return q.vector(models.embedder, embed_text=models.text_vector)
    with models.embed_lock:
        return q.vector(models.embedder)


@router.get("/index/{name}/images/{item_id}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def index_image(name: str, item_id: int, models: Models = Depends(get_models)):
    """An indexed image by its id (as a PNG thumbnail of at most 256 px)."""
    index = find_index(models, name)
    row = index.snapshot.rows([item_id]).get(item_id)
    if row is None:
        raise HTTPException(404, f"index {name} has no image {item_id}")
    return Response(read_indexed(row["path"]), media_type="image/png")


@router.post("/classify")
def classify(req: ClassifyRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    """Zero-shot: the probability of each label for each image."""
    from ..search import TEMPLATES, check_templates, classify as zero_shot, parse_labels

    if models.embedder is None:
        raise UsageError(f"{models.name} has no CLIP (clip/): classify needs one")
    labels = req.labels if isinstance(req.labels, str) else ",".join(req.labels)
    if not isinstance(req.labels, str) and any("," in s for s in req.labels):
        raise UsageError("a label may not contain a comma")
    limits = server.limits
    check_text("labels", labels, limits)
    names = parse_labels(labels, None)
    templates = tuple(req.templates) if req.templates is not None else TEMPLATES
    # classify holds the text tower's lock, which text search needs too: cap what one request embeds
    check_range("number of labels", len(names), 2, limits.max_labels)
    check_range("number of templates", len(templates), 1, limits.max_templates)
    check_range("labels x templates", len(names) * len(templates), 1, limits.max_label_texts)
    for i, t in enumerate(templates):
        check_text(f"templates[{i}]", t, limits)
    check_templates(templates)
    check_range("number of images", len(req.images), 1, limits.max_uploads)
    pics = [decode_b64_image(b, limits.max_pixels, f"images[{i}]") for i, b in enumerate(req.images)]
    with models.embed_lock:
        probs = zero_shot(models.embedder, pics, names, templates)
    return [{"label": names[int(row.argmax())], "probabilities": {n: round(float(v), 6) for n, v in zip(names, row)}}
            for row in probs]


@router.post("/index/{name}/add")
def add(name: str, req: AddRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    """Add images (base64, optional captions) to an index; images already in it are skipped."""
    from ..files import atomic_write_bytes, sha256_bytes
    from ..search import add_to_index
    from ..images import png_bytes
    from .media import decode_b64, decode_image_bytes

    limits = server.limits
    index = find_index(models, name)
    check_range("number of images", len(req.images), 1, limits.max_uploads)
    files = []
    for i, item in enumerate(req.images):
        data = decode_b64(item.image, f"images[{i}]")
        img = decode_image_bytes(data, limits.max_pixels, f"images[{i}]")  # checked before anything is kept
        check_text(f"images[{i}].caption", item.caption or "", limits)
        files.append((sha256_bytes(data), data, img, item.caption))
    with index.write_lock:
        index.uploads.mkdir(exist_ok=True)
        paths = []
        for sha, data, img, caption in files:  # named by content: the client never picks a path
            path = index.uploads / f"{sha}.png"
            if not path.exists():
                atomic_write_bytes(path, data if data[:8] == b"\x89PNG\r\n\x1a\n" else png_bytes(img))
            if caption:
                atomic_write_bytes(path.with_suffix(".txt"), caption.encode())
            paths.append(path)
        with models.embed_lock:
            report = add_to_index(index.path, paths, models.embedder)
        index.reload()
    return {"index": name, "added": report.added, "duplicates": len(report.duplicates), "total": report.total,
            "version": report.version, "problems": [p.reason for p in report.problems]}
