"""What the routers share: the Server state, FastAPI dependencies (server, models, API key) and the
two ways onto the generation lane (submit, wait_for)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from .jobs import Job, JobQueue, QueueClosed, QueueFull
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

    def drain(self, reason: str = "the server is shutting down") -> None:
        """Start stopping: new work gets 503, waiting jobs fail, the running one stops at its next check,
        so every event stream ends. Returns at once."""
        self.queue.close(reason)

    @property
    def stopping(self) -> bool:
        return self.queue.closed


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


KEY_MISSING = "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key: KEY)"


def require_key(request: Request, header: str | None = Security(_header_key),
                bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                basic: HTTPBasicCredentials | None = Security(_basic)) -> None:
    """401 unless the request carries the server's key: Bearer, X-API-Key or the Basic password. The
    parameters declare the schemes for /docs; the headers are read by key_in_headers, which app.Gate
    also uses before a body is read."""
    key = get_server(request).api_key
    if key and not key_in_headers(request.headers, key):
        raise HTTPException(401, KEY_MISSING, headers={"WWW-Authenticate": "Bearer"})


def require_key_browser(request: Request, header: str | None = Security(_header_key),
                        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                        basic: HTTPBasicCredentials | None = Security(_basic)) -> None:
    """require_key for pages a browser opens (/docs): its 401 asks for HTTP Basic, so the browser prompts."""
    try:
        require_key(request, header, bearer, basic)
    except HTTPException as e:
        raise HTTPException(401, e.detail, headers={"WWW-Authenticate": 'Basic realm="sfumato"'}) from None


def key_in_headers(headers, key: str) -> bool:
    """Whether request headers carry `key`: a Bearer token, else the password of HTTP Basic (as
    AUTOMATIC1111 clients send --api-auth user:password; malformed: none), else X-API-Key. Parsed as
    FastAPI's HTTPBearer and HTTPBasic parse them."""
    import base64
    import binascii

    from fastapi.security.utils import get_authorization_scheme_param

    authorization = headers.get("authorization")
    scheme, param = get_authorization_scheme_param(authorization)
    if scheme.lower() == "bearer" and param:
        given = param
    elif scheme.lower() == "basic":
        try:
            _, colon, given = base64.b64decode(param).decode("ascii").partition(":")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            colon = given = ""
        given = given if colon else ""
    else:
        given = headers.get("x-api-key") or ""
    return hmac.compare_digest(given.encode(), key.encode())


def submit(server: Server, kind: str, run, total: int = 0) -> Job:
    """Queue a job on the lane; 429 with Retry-After when the queue is full, 503 when the server stops."""
    try:
        return server.queue.submit(kind, run, total)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except QueueClosed as e:
        raise HTTPException(503, str(e), headers={"Connection": "close"}) from None


async def wait_for(job: Job) -> Job:
    """Wait without holding a thread; 504 when the job ran out of time, 422 or 500 when it failed."""
    await asyncio.wrap_future(job.finished_future)
    if job.timed_out:
        raise HTTPException(504, job.error)
    if job.status == "failed":
        raise HTTPException(422 if job.user_error else 500, job.error)
    return job
