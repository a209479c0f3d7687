"""The FastAPI app: start-up loading, auth, body cap, error shapes, health, the web page, and the
native, AUTOMATIC1111 and clip-retrieval routers.

Nothing is loaded at import: `create_app(loader)` returns an app whose start-up runs `loader()` in
a thread; /readyz answers 503 until it has finished, /healthz 200 all along.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from ..errors import SfumatoError, UsageError
from .a1111 import router as a1111
from .deps import Server, require_key
from .jobs import JobQueue
from .knn import router as knn
from .limits import Limits
from .models import Models
from .native import router as native

log = logging.getLogger("sfumato.server")
STATIC = Path(__file__).parent / "static"


def create_app(loader: Callable[[], Models], api_key: str | None = None, limits: Limits | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app. `loader()` runs at start-up in a thread and returns the Models to serve.

    Args:
        loader: loads the model and indexes (see `model_loader`); its errors make /readyz 503 for good
            and are passed to `on_load_error` (the CLI stops the server with them).
        api_key: when set, every route but the page, docs and health needs it (Bearer, X-API-Key or
            HTTP Basic password).
        limits: request and job caps.
    """
    from contextlib import asynccontextmanager

    limits = limits or Limits()
    server = Server(limits, api_key, JobQueue(limits.max_queue, limits.job_seconds, limits.keep_jobs))

    def load() -> None:
        try:
            server.models = loader()
            log.info("models loaded; ready")
        except Exception as e:  # shown by /readyz and the CLI
            server.load_error = str(e) or type(e).__name__
            log.error("cannot load models: %s", server.load_error)
            if on_load_error is not None:
                on_load_error(server.load_error)

    @asynccontextmanager
    async def lifespan(app):
        server.queue.start()
        threading.Thread(target=load, name="sfumato-load", daemon=True).start()
        yield
        server.queue.stop()

    app = FastAPI(title="sfumato", lifespan=lifespan, description="Generate, search, classify and explain "
                  "images. Native API under /v1; AUTOMATIC1111-compatible under /sdapi/v1; clip-retrieval "
                  "back-end at /knn-service, /indices-list, /metadata.")
    app.state.server = server
    app.add_middleware(BodyCap, max_body=limits.max_body)
    _add_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        if server.models is None:
            detail = f"cannot load models: {server.load_error}" if server.load_error else "models are loading"
            return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)
        return {"status": "ready", "model": server.models.name, "indexes": list(server.models.indexes),
                "queue": server.queue.pending()}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    auth = [Depends(require_key)]
    app.include_router(native, dependencies=auth)
    app.include_router(a1111, dependencies=auth)
    app.include_router(knn, dependencies=auth)
    return app


# ---------------------------------------------------------------- errors and body cap


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UsageError)
    async def usage(request, exc: UsageError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(SfumatoError)
    async def failure(request, exc: SfumatoError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts),
                             "errors": [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]},
                            status_code=422)


class BodyCap:
    """413 for a request body over the cap, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(send)
        if length is not None:
            return await self.app(scope, receive, send)
        body, more, chunks = 0, True, []
        while more:  # no length: read it all (up to the cap), then replay it
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += len(message.get("body", b""))
            if body > self.max_body:
                return await self._too_large(send)
            chunks.append(message)
            more = message.get("more_body", False)
        return await self.app(scope, _replay(chunks, receive), send)

    async def _too_large(self, send):
        response = JSONResponse({"detail": f"request body over the limit of {self.max_body:,} bytes"},
                                status_code=413)
        await response({"type": "http"}, None, send)


def _replay(messages, receive=None):
    async def replayed():
        if messages:
            return messages.pop(0)
        return await receive()

    return replayed
