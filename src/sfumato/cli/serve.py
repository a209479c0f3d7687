"""`sfumato serve`: the HTTP API and web page over one model folder and its indexes.

    sfumato serve --model models/mine --index shapes.index            # http://127.0.0.1:7860/
    sfumato serve --host 0.0.0.0 --api-key "$KEY"                     # other machines need the key
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import SfumatoError, UsageError
from .console import console


app = typer.Typer()


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback it needs --api-key."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: shipped model)."),
    index: Optional[list[Path]] = typer.Option(None, "--index", help="Index to serve, by its folder name "
                                               "(repeatable)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SFUMATO_API_KEY",
                                          help="Key every API request must carry (Bearer, X-API-Key or Basic)."),
    max_queue: int = typer.Option(8, "--max-queue", help="Generation jobs that may wait; more get 429."),
    job_seconds: float = typer.Option(600.0, "--job-seconds", help="Time limit of one job."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="Another Host name this server "
                                                   "answers to, besides 127.0.0.1, localhost and [::1] (repeatable)."),
) -> None:
    """Serve the native API (/docs), AUTOMATIC1111 and clip-retrieval endpoints, and a web page."""
    try:
        import uvicorn

        from ..server import Limits, allowed_hosts, check_bind, create_app, model_loader
    except ImportError as e:
        raise SfumatoError(f"serving needs the serve extra: pip install 'sfumato[serve]' ({e})") from None

    check_bind(host, api_key)
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    if max_queue < 0 or job_seconds <= 0:
        raise UsageError("--max-queue must be 0 or more and --job-seconds above 0")
    if model is not None and not model.is_dir():
        raise UsageError(f"model folder {model} does not exist")
    for p in index or ():
        if not p.is_dir():
            raise UsageError(f"{p}: no such index (make one with `sfumato index build`)")
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(error: str) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(model_loader(model, list(index or ())), api_key=api_key,
                     limits=Limits(max_queue=max_queue, job_seconds=job_seconds), on_load_error=stop,
                     hosts=allowed_hosts(host, list(allow_host or ())))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=os.environ.get("SFUMATO_LOG", "info")))
    console.print(f"serving on http://{host}:{port}/ (API docs at /docs); loading models", highlight=False)
    server.run()
    if failed:
        raise SfumatoError(f"cannot load models: {failed[0]}")
