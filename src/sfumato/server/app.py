"""The FastAPI app: start-up loading, auth, body cap, error shapes, health, the web page, and the
native, AUTOMATIC1111 and clip-retrieval routers.

Nothing is loaded at import: `create_app(loader)` returns an app whose start-up runs `loader()` in
a thread; /readyz answers 503 until it has finished, /healthz 200 all along.

Stopping: `app.state.server.drain()` (the CLI calls it on SIGTERM/SIGINT, before uvicorn waits for open
responses) refuses new requests with 503, fails the waiting jobs and stops the running one, so event
streams end and the process can exit.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import SfumatoError, UsageError
from .a1111 import router as a1111
from .deps import KEY_MISSING, Server, key_in_headers, require_key, require_key_browser
from .jobs import JobQueue, QueueFull
from .knn import router as knn
from .limits import Limits
from .media import UnsupportedImage, clean
from .models import Models
from .native import router as native

log = logging.getLogger("sfumato.server")
STATIC = Path(__file__).parent / "static"
CORS_PATHS = frozenset(route.path for route in knn.routes)  # clip-retrieval's: the only ones --cors opens


def create_app(loader: Callable[[], Models], api_key: str | None = None, limits: Limits | None = None,
               on_load_error: Callable[[str], None] | None = None, hosts: list[str] | None = None,
               cors: list[str] | None = None) -> FastAPI:
    """The app. `loader()` runs at start-up in a thread and returns the Models to serve.

    Args:
        loader: loads the model and indexes (see `model_loader`); its errors make /readyz 503 for good
            and are passed to `on_load_error` (the CLI stops the server with them).
        api_key: when set, every route but the page, docs and health needs it (Bearer, X-API-Key or
            HTTP Basic password).
        limits: request and job caps.
        hosts: the Host header values served (`allowed_hosts`); others get 400. None: any host.
        cors: origins (or "*") whose pages may call the clip-retrieval endpoints, as its back end allows
            any (flask_cors), so its web front end served elsewhere can query this server. None: no CORS.
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

    # docs served below, behind the key: FastAPI's own /docs, /redoc and /openapi.json take no dependencies
    app = FastAPI(title="sfumato", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, description="Generate, search, classify and explain "
                  "images. Native API under /v1; AUTOMATIC1111-compatible under /sdapi/v1; clip-retrieval "
                  "back-end at /knn-service, /indices-list, /metadata.")
    app.state.server = server
    app.add_middleware(BodyCap, max_body=limits.max_body)
    app.add_middleware(Gate, server=server)  # outside BodyCap: refuses before any body is read
    app.add_middleware(SameOrigin, hosts=hosts, cors=cors or (), cors_paths=CORS_PATHS)
    if cors:  # outside the refusals above, so a browser can read them too
        app.add_middleware(CorsFor, paths=CORS_PATHS, origins=cors)
    if hosts is not None:  # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    _add_error_handlers(app)

    # async: answered on the event loop, not after a hop to the thread pool, which a flood keeps busy
    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"status": "ok"}

    auth = [Depends(require_key)]

    @app.get("/readyz", tags=["health"], dependencies=auth)
    async def readyz():
        if server.models is None:
            detail = f"cannot load models: {server.load_error}" if server.load_error else "models are loading"
            return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)
        return {"status": "ready", "model": server.models.name, "indexes": list(server.models.indexes),
                "queue": server.queue.pending()}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    _add_docs(app, [Depends(require_key_browser)])
    app.include_router(native, dependencies=auth)
    app.include_router(a1111, dependencies=auth)
    app.include_router(knn, dependencies=auth)
    return app


def _add_docs(app: FastAPI, auth: list) -> None:
    """/openapi.json, /docs and /redoc, behind the key when one is set (the API's whole description)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sfumato - API")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="sfumato - API")


# ---------------------------------------------------------------- errors and body cap


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnsupportedImage)
    async def unsupported(request, exc: UnsupportedImage):
        return JSONResponse({"detail": clean(str(exc))}, status_code=415)

    @app.exception_handler(UsageError)
    async def usage(request, exc: UsageError):
        return JSONResponse({"detail": clean(str(exc))}, status_code=422)

    @app.exception_handler(SfumatoError)
    async def failure(request, exc: SfumatoError):
        return JSONResponse({"detail": clean(str(exc))}, status_code=422)

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


SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")


class SameOrigin:
    """403 for a state-changing request from a foreign origin: a browser page elsewhere may POST a
    form here (no CORS preflight for form content types), so the Origin header is checked. Our own:
    Starlette's CORSMiddleware only adds response headers and never refuses a request. Origins given
    to --cors pass on the paths it opens."""

    def __init__(self, app, hosts: list[str] | None, cors=(), cors_paths=frozenset()):
        self.app, self.hosts, self.cors, self.cors_paths = app, set(hosts or ()), set(cors), cors_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"].encode() not in SAFE_METHODS:
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin")
            origin = None if origin is None else origin.decode("latin-1")
            if origin is not None and not self._same(origin, headers.get(b"host", b"")) \
                    and not self._cors(origin, scope["path"]):
                response = JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _cors(self, origin: str, path: str) -> bool:
        return path in self.cors_paths and ("*" in self.cors or origin in self.cors)

    def _same(self, origin: str, host: bytes) -> bool:
        from urllib.parse import urlsplit

        try:
            o = urlsplit(origin)
            name = (o.hostname or "").lower()
        except ValueError:
            return False
        if o.scheme not in ("http", "https") or not name:
            return False  # "null" (sandboxed pages, file://) and the like
        if o.netloc.lower() == host.decode("latin-1").lower():
            return True
        return (f"[{name}]" if ":" in name else name) in self.hosts


class CorsFor:
    """Starlette's CORSMiddleware on some paths only: preflights answered, Access-Control-Allow-Origin
    sent to the origins given; every other path answers as without it."""

    def __init__(self, app, paths: frozenset, origins: list[str]):
        self.app, self.paths = app, paths
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST"],
                                   allow_headers=["Content-Type", "Authorization", "X-API-Key"])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.paths:
            return await self.cors(scope, receive, send)
        return await self.app(scope, receive, send)


class Gate:
    """Refusals decided from the request line and headers alone, before a body is read or parsed, so
    they stay cheap under a flood: once the server is stopping, 503 for everything but /healthz; with a
    key set, 401 for a state-changing request without it (every such route needs it); 429 for a new
    generation while the queue is full (the route's submit() checks again). Our own ASGI code: FastAPI
    dependencies run only after the body has been read and parsed."""

    QUEUED = frozenset({"/v1/generate", "/v1/explain", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"})

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = self._refusal(scope)
            if response is not None:
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        server, path, method = self.server, scope["path"], scope["method"]
        if server.stopping and path != "/healthz":
            return JSONResponse({"detail": "the server is shutting down"}, status_code=503,
                                headers={"Connection": "close"})
        if method.encode() in SAFE_METHODS:
            return None
        if server.api_key and not key_in_headers(Headers(scope=scope), server.api_key):
            return JSONResponse({"detail": KEY_MISSING}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if method == "POST" and path in self.QUEUED and server.queue.full():
            e = QueueFull(server.queue.retry_after(), server.queue.max_queue)
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        return None


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
