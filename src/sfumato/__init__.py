"""sfumato: a shared text-image space and a latent-diffusion generator learned from paired data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sfumato")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from .errors import SfumatoError, UsageError

__all__ = ["__version__", "SfumatoError", "UsageError"]
