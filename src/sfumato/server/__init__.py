"""The HTTP server: a native JSON API, AUTOMATIC1111- and clip-retrieval-compatible endpoints, and a
web page, over one loaded model folder and its indexes (FastAPI + uvicorn, the `serve` extra).

    sfumato serve --model models/mine --index shapes.index          # http://127.0.0.1:7860/

    from sfumato.server import create_app, model_loader
    app = create_app(model_loader("models/mine", ["shapes.index"]))
"""

from .app import create_app
from .limits import Limits, allowed_hosts, check_bind, check_origins
from .models import model_loader

__all__ = ["create_app", "Limits", "allowed_hosts", "check_bind", "check_origins", "model_loader"]
