"""Images in and out of requests: base64 (with or without a data: prefix), PNG data URLs, previews.

Every uploaded image is checked by its first bytes before anything decodes it: a format the server
does not take (GIF, TIFF, EPS, ... whatever a request calls it) is refused with 415 naming the accepted
ones. A PNG taken as bytes (decode_b64: /sdapi/v1/png-info reads only its header and text chunks, index
adds keep the file) must also be whole: its chunks and checksums through IEND.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from ..errors import UsageError
from ..images import png_bytes

_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.I)
ACCEPTED = "PNG, JPEG or WebP"
_MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}
_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class UnsupportedImage(UsageError):
    """An image in a format the server does not take (the app answers 415)."""


def image_format(data: bytes) -> str | None:
    """'PNG', 'JPEG' or 'WEBP' from the first bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((f for f, heads in _MAGIC.items() if data.startswith(heads)), None)


def _other_format(data: bytes) -> str | None:
    """The name of another image format the bytes start with, by Pillow's own signature checks
    (each plugin's `_accept`, which looks at the first bytes only and parses nothing)."""
    from PIL import Image

    Image.init()
    head = data[:64]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # a plugin's check on bytes it does not expect
            continue
    return None


def check_image_bytes(data: bytes, name: str = "image") -> str:
    """The format of an uploaded image, or an error: UnsupportedImage (415) for another image format,
    UsageError for bytes that are no image or a PNG cut short or corrupted."""
    fmt = image_format(data)
    if fmt is None:
        other = _other_format(data)
        if other is not None:
            raise UnsupportedImage(f"{name} is a {other} image; send {ACCEPTED}")
        raise UsageError(f"{name}: unreadable image: not a {ACCEPTED} file")
    if fmt == "PNG":
        _verify_png(data, name)
    return fmt


def _verify_png(data: bytes, name: str) -> None:
    """Every chunk present with a good checksum (Pillow's verify reads chunks, inflates nothing)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
            im.verify()
    except Image.DecompressionBombError as e:
        raise UsageError(f"{name}: image too large, over the decompression-bomb cap ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        why = clean(str(e)) or type(e).__name__
        raise UsageError(f"{name}: unreadable image: truncated or corrupt PNG ({why})") from None


def clean(message: str) -> str:
    """A message without object reprs such as `<_io.BytesIO object at 0x7f...>` (library errors embed
    them; they say nothing to a client)."""
    return _REPR.sub("", message).strip()


def decode_b64_image(text: str, max_pixels: int, name: str = "image"):
    """A base64 image (PNG, JPEG or WebP) -> RGB PIL image; size-capped from its header before decoding."""
    return decode_image_bytes(_b64_bytes(text, name), max_pixels, name)


def decode_image_bytes(data: bytes, max_pixels: int, name: str = "image"):
    """Uploaded bytes -> RGB PIL image, after check_image_bytes' format check."""
    from ..pairs import decode_image

    if image_format(data) is None:
        check_image_bytes(data, name)  # raises, naming the format
    return decode_image(data, max_pixels=max_pixels, name=name)  # decoding it all checks it whole


def decode_b64(text: str, name: str = "image") -> bytes:
    """The bytes of a base64 image, checked (check_image_bytes) without decoding its pixels."""
    data = _b64_bytes(text, name)
    check_image_bytes(data, name)
    return data


def _b64_bytes(text: str, name: str) -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{name} is empty; send a base64-encoded {ACCEPTED}")
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{name} is not valid base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


def latent_preview(vae, latents, side: int = 128) -> bytes:
    """The first image of a batch of (noisy) latents, decoded by the VAE, as a PNG of at most `side` px.
    Latents larger than that are shrunk before decoding: a full-size decode of a large image costs
    seconds on a CPU, and a preview is drawn every few steps."""
    import torch.nn.functional as F
    from PIL import Image

    from ..sampling import decode_latents

    lat = latents[:1]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = lat.shape[-2:]
    scale = side / (factor * max(h, w))
    if scale < 1:
        lat = F.interpolate(lat, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    img = Image.fromarray(decode_latents(vae, lat)[0].numpy())
    if max(img.size) > side:
        img.thumbnail((side, side))
    return png_bytes(img)
