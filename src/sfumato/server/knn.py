"""clip-retrieval's back-end API (/knn-service, /indices-list, /metadata), so its front-end and
clients query sfumato indexes unchanged.

Results carry id, similarity, caption and the image as base64 (clip-retrieval returns `image` for
indexes of local files). The server fetches nothing: `image_url` is refused. Filters that need
models sfumato does not have (safety, violence, aesthetic score) are accepted and have no effect.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

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
    deduplicate: bool = True
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[str] = None
    aesthetic_weight: Optional[str] = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    ids: list[int]
    indice_name: Optional[str] = None


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


@router.post("/knn-service")
def knn_service(req: KnnRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    from ..search import search

    if req.modality != "image":
        raise UsageError(f"modality {req.modality!r}: sfumato indexes hold image embeddings only; use 'image'")
    if req.use_mclip:
        raise UsageError("use_mclip: no multilingual CLIP is loaded")
    index = find_index(models, req.indice_name)
    k = req.num_result_ids or req.num_images
    check_range("num_images", k, 1, server.limits.max_k)
    hits = search(index.snapshot, _query(req, server, models), k)
    out = []
    for h in hits[:req.num_images]:
        out.append({"id": h.id, "similarity": round(h.score, 6), "caption": h.caption or "",
                    "image": b64(read_indexed(h.path))})
    return out


@router.post("/metadata")
def metadata(req: MetadataRequest, server: Server = Depends(get_server), models: Models = Depends(get_models)):
    index = find_index(models, req.indice_name)
    check_range("number of ids", len(req.ids), 0, server.limits.max_k)
    rows = index.snapshot.rows(req.ids)
    return {"metadata": [{"id": i, "metadata": {"caption": rows[i]["caption"] or "", "width": rows[i]["width"],
                                                "height": rows[i]["height"]}}
                         for i in req.ids if i in rows]}
