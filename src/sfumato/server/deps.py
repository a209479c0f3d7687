"""What the routers share: the Server state, FastAPI dependencies (server, models, API key) and the
two ways onto the generation lane (submit, wait_for)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from .jobs import Job, JobQueue, QueueFull
from .limits import Limits
from .models import Models


@dataclass
class Server:
    """What the routes share: limits, the generation lane, and the models once loaded."""

    limits: Limits
    api_key: str | None
    queue: JobQueue
    models: Models | None = None
    load_error: str | None = None
    options: dict = field(default_factory=dict)  # AUTOMATIC1111 /options the client may set


def get_server(request: Request) -> Server:
    return request.app.state.server


def get_models(request: Request) -> Models:
    """The loaded models, or 503 while they load."""
    server = get_server(request)
    if server.models is None:
        detail = f"cannot load models: {server.load_error}" if server.load_error else "models are loading; retry"
        raise HTTPException(503, detail, headers={"Retry-After": "5"})
    return server.models


class _BasicPassword(HTTPBasic):
    """HTTP Basic, as AUTOMATIC1111 clients send --api-auth user:password; a malformed header gives
    an empty password (a 401 when a key is set) instead of failing on its own."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:
        try:
            return await super().__call__(request)
        except HTTPException:
            return HTTPBasicCredentials(username="", password="")


_header_key = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)
_basic = _BasicPassword(auto_error=False)


def require_key(request: Request, header: str | None = Security(_header_key),
                bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                basic: HTTPBasicCredentials | None = Security(_basic)) -> None:
    """401 unless the request carries the server's key: Bearer, X-API-Key or the Basic password."""
    key = get_server(request).api_key
    if not key:
        return
    given = bearer.credentials.strip() if bearer else basic.password if basic else header or ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key: KEY)",
                            headers={"WWW-Authenticate": "Bearer"})


def require_key_browser(request: Request, header: str | None = Security(_header_key),
                        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                        basic: HTTPBasicCredentials | None = Security(_basic)) -> None:
    """require_key for pages a browser opens (/docs): its 401 asks for HTTP Basic, so the browser prompts."""
    try:
        require_key(request, header, bearer, basic)
    except HTTPException as e:
        raise HTTPException(401, e.detail, headers={"WWW-Authenticate": 'Basic realm="sfumato"'}) from None


def submit(server: Server, kind: str, run, total: int = 0) -> Job:
    """Queue a job on the lane, or 429 with Retry-After when the queue is full."""
    try:
        return server.queue.submit(kind, run, total)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None


async def wait_for(job: Job) -> Job:
    """Wait without holding a thread; 504 when the job ran out of time, 422 or 500 when it failed."""
    await asyncio.wrap_future(job.finished_future)
    if job.timed_out:
        raise HTTPException(504, job.error)
    if job.status == "failed":
        raise HTTPException(422 if job.user_error else 500, job.error)
    return job
