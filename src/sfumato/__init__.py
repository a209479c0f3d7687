"""sfumato: a shared text-image space and a latent-diffusion generator learned from paired data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sfumato")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from .config import GenerationSettings
from .errors import SfumatoError, UsageError


def load(model=None, device=None, onnx=None):
    """Load a model folder (default: the shipped model) for generation; see sfumato.pipeline.load."""
    from .pipeline import load as _load

    return _load(model, device, onnx)


__all__ = ["__version__", "GenerationSettings", "SfumatoError", "UsageError", "load"]
