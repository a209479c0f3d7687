"""Images in and out of requests: base64 (with or without a data: prefix), PNG data URLs, previews."""

from __future__ import annotations

import base64
import binascii
import re

from ..errors import UsageError
from ..images import png_bytes

_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.I)


def decode_b64_image(text: str, max_pixels: int, name: str = "image"):
    """A base64 image (PNG, JPEG or WebP) -> RGB PIL image; size-capped from its header before decoding."""
    from ..pairs import decode_image

    data = decode_b64(text, name)
    return decode_image(data, max_pixels=max_pixels, name=name)


def decode_b64(text: str, name: str = "image") -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{name} is empty; send a base64-encoded PNG, JPEG or WebP")
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{name} is not valid base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


def latent_preview(vae, latents, side: int = 128) -> bytes:
    """The first image of a batch of (noisy) latents, decoded by the VAE, as a small PNG."""
    from PIL import Image

    from ..sampling import decode_latents

    img = Image.fromarray(decode_latents(vae, latents[:1])[0].numpy())
    if max(img.size) > side:
        img.thumbnail((side, side))
    return png_bytes(img)
