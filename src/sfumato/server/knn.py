"""clip-retrieval's back-end API (/knn-service, /indices-list, /metadata), so its front-end and
clients query sfumato indexes unchanged.

Bodies are read as JSON whatever their Content-Type, as clip-retrieval's back end reads them: its
Python client sends none and its web page sends text/plain. As its back end, /knn-service answers
up to num_result_ids hits, the first num_images of them with caption and the image as base64
(clip-retrieval returns `image` for indexes of local files), the rest with id and similarity only:
its web page fetches their metadata from /metadata as the user scrolls. `deduplicate` drops
near-duplicates of a better hit as its back end does. The server fetches nothing: `image_url` is
refused. Filters that need models sfumato does not have (safety, violence, aesthetic embeddings) are
accepted and have no effect, as in a clip-retrieval back end started without those models.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import UsageError
from .deps import Server, get_models, get_server
from .media import b64, decode_b64_image
from .models import Models
from .native import embed_query, find_index, read_indexed
from .work import check_range, check_text

router = APIRouter(tags=["clip-retrieval"])


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: Optional[str] = None
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[list[float]] = None
    modality: str = "image"
    num_images: int = 40
    num_result_ids: Optional[int] = None
    indice_name: Optional[str] = None
    deduplicate: bool = False  # the back end's default when absent; its client and web page send true
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    # clip-retrieval's client sends numbers, its web page strings ("" for none)
    aesthetic_score: Union[int, str, None] = None
    aesthetic_weight: Union[float, str, None] = None

    @field_validator("aesthetic_score", "aesthetic_weight")
    @classmethod
    def _number(cls, v, info):
        """Read as the back end reads them (int(score), float(weight)); a bad value is the client's mistake."""
        if v is None or v == "":
            return None
        try:
            return int(v) if info.field_name == "aesthetic_score" else float(v)
        except ValueError:
            raise ValueError("must be a number or empty") from None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    ids: list[int]
    indice_name: Optional[str] = None


async def json_body(request: Request) -> Any:
    """The body as JSON, whatever its Content-Type (flask's get_json(force=True))."""
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error ({e})",
                                       "input": {}}]) from None


def _parse(model: type[BaseModel], body: Any) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _body_doc(model: type[BaseModel]) -> dict:
    """The request schema for /docs (the route reads its body itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get("/indices-list")
def indices_list(models: Models = Depends(get_models)):
    return list(models.indexes)


def _query(req: KnnRequest, server: Server, models: Models) -> np.ndarray:
    """clip-retrieval's order: text, else image, else embedding_input (the first given wins)."""
    from ..search import Query

    if req.text:
        check_text("text", req.text, server.limits)
        q = Query(text=req.text)
    elif req.image:
        q = Query(image=decode_b64_image(req.image, server.limits.max_pixels))
    elif req.image_url:
        raise UsageError("image_url is not supported: this server fetches nothing; send the image as base64 in image")
    elif req.embedding_input:
        q = Query(embedding=req.embedding_input)
    else:
        raise UsageError("give text, image or embedding_input")
    return embed_query(q.validate(flag=""), models)


@router.post("/knn-service", openapi_extra=_body_doc(KnnRequest))
def knn_service(body: Any = Depends(json_body), server: Server = Depends(get_server),
                models: Models = Depends(get_models)):
    from ..search import search

    req = _parse(KnnRequest, body)
    if req.modality != "image":
        raise UsageError(f"modality {req.modality!r}: sfumato indexes hold image embeddings only; use 'image'")
    if req.use_mclip:
        raise UsageError("use_mclip: no multilingual CLIP is loaded")
    index = find_index(models, req.indice_name)
    check_range("num_images", req.num_images, 1, server.limits.max_k)
    k = req.num_images if req.num_result_ids is None else req.num_result_ids
    check_range("num_result_ids", k, 1, server.limits.max_result_ids)
    hits = search(index.snapshot, _query(req, server, models), k, deduplicate=req.deduplicate)
    out = []
    for rank, h in enumerate(hits):
        item = {"id": h.id, "similarity": round(h.score, 6)}
        if rank < req.num_images:  # the rest: the client asks /metadata when it needs them
            item.update(caption=h.caption or "", image=b64(read_indexed(h.path)))
        out.append(item)
    return out


@router.post("/metadata", openapi_extra=_body_doc(MetadataRequest))
def metadata(body: Any = Depends(json_body), server: Server = Depends(get_server),
             models: Models = Depends(get_models)):
    req = _parse(MetadataRequest, body)
    index = find_index(models, req.indice_name)
    check_range("number of ids", len(req.ids), 0, server.limits.max_k)
    rows = index.snapshot.rows(req.ids)
    # clip-retrieval's shape: a list of {id, metadata}, which its web page merges into the hits it shows
    return [{"id": i, "metadata": {"caption": rows[i]["caption"] or "", "image": b64(read_indexed(rows[i]["path"])),
                                   "width": rows[i]["width"], "height": rows[i]["height"]}}
            for i in req.ids if i in rows]
