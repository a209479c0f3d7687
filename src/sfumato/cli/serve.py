"""`sfumato serve`: the HTTP API and web page over one model folder and its indexes.

    sfumato serve --model models/mine --index shapes.index            # http://127.0.0.1:7860/
    sfumato serve --host 0.0.0.0 --api-key "$KEY"                     # other machines need the key
"""

from __future__ import annotations

import os
import threading
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
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the first --index's "
                                         "model, else the shipped one)."),
    index: Optional[list[Path]] = typer.Option(None, "--index", help="Index to serve, by its folder name "
                                               "(repeatable)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SFUMATO_API_KEY",
                                          help="Key every API request must carry (Bearer, X-API-Key or Basic)."),
    max_queue: int = typer.Option(8, "--max-queue", help="Generation jobs that may wait; more get 429."),
    job_seconds: float = typer.Option(600.0, "--job-seconds", help="Time limit of one job."),
    max_cost: float = typer.Option(1000.0, "--max-cost", help="Largest generation job, in native-image "
                                   "steps: (width*height / native size squared) x steps x images."),
    max_step_cost: float = typer.Option(8.0, "--max-step-cost", help="Largest sampler step, "
                                        "in native images: (width*height / native size squared) x images."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="Another Host name this server "
                                                   "answers to, besides 127.0.0.1, localhost and [::1] (repeatable)."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="An origin (https://host[:port]) whose web pages "
                                             "may query the clip-retrieval endpoints, as clip-retrieval's front end "
                                             "served elsewhere does; * for any (repeatable; default none)."),
) -> None:
    """Serve the native API (/docs), AUTOMATIC1111 and clip-retrieval endpoints, and a web page."""
    try:
        import uvicorn

        from ..server import Limits, allowed_hosts, check_bind, check_origins, create_app, model_loader
    except ImportError as e:
        raise SfumatoError(f"serving needs the serve extra: pip install 'sfumato[serve]' ({e})") from None

    check_bind(host, api_key)
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    if max_queue < 0 or job_seconds <= 0:
        raise UsageError("--max-queue must be 0 or more and --job-seconds above 0")
    if not (max_cost > 0 and max_step_cost > 0):
        raise UsageError("--max-cost and --max-step-cost must be above 0")
    if model is not None and not model.is_dir():
        raise UsageError(f"model folder {model} does not exist")
    origins = check_origins(list(cors or ()))
    for p in index or ():
        if not p.is_dir():
            raise UsageError(f"{p}: no such index (make one with `sfumato index build`)")
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(error: str) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    limits = Limits(max_queue=max_queue, job_seconds=job_seconds, max_cost=max_cost, max_step_cost=max_step_cost)
    app = create_app(model_loader(model, list(index or ())), api_key=api_key, limits=limits, on_load_error=stop,
                     hosts=allowed_hosts(host, list(allow_host or ())), cors=origins or None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn waits for open responses before the app's shutdown runs, and an event stream ends
            # only with its job: drain first (new work 503, jobs end, streams close). In a thread: this
            # runs in a signal handler, which may have interrupted the queue's own lock holder.
            threading.Thread(target=app.state.server.drain, name="sfumato-drain", daemon=True).start()
            super().handle_exit(sig, frame)

    # timeout_graceful_shutdown: any other response still open after 5 s is cancelled
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=os.environ.get("SFUMATO_LOG", "info"),
                                   timeout_graceful_shutdown=5))
    console.print(f"serving on http://{host}:{port}/ (API docs at /docs); loading models", highlight=False)
    server.run()
    if failed:
        raise SfumatoError(f"cannot load models: {failed[0]}")
