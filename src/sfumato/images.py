"""Images and arrays on disk and on the wire: PNG bytes that keep their AUTOMATIC1111 `parameters`
chunk, whole-or-nothing saves, reading the parameters back, and compressed .npz bytes.

    save_png(img, Path("out.png"))      # img.info["parameters"] travels into the file
    read_parameters(Path("out.png"))    # -> "a red circle\\nSteps: 20, Sampler: DPM++ 2M, ..."
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import UsageError
from .files import atomic_write_bytes


def png_bytes(img: Image.Image) -> bytes:
    """The image as PNG bytes with its `parameters` text chunk (when it has one)."""
    meta = PngImagePlugin.PngInfo()
    if "parameters" in img.info:
        meta.add_text("parameters", img.info["parameters"])
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG with its `parameters` text chunk, whole or not at all."""
    atomic_write_bytes(path, png_bytes(img))


def read_parameters(path: Path) -> str:
    """The `parameters` chunk of a PNG written by sfumato or AUTOMATIC1111."""
    from .pairs import open_image

    img = open_image(path)
    with Image.open(path) as raw:
        text = raw.info.get("parameters") or img.info.get("parameters")
    if not text:
        raise UsageError(f"{path} has no generation parameters")
    return text


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Named arrays as the bytes of a compressed .npz file."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
