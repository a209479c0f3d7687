"""AUTOMATIC1111's img2img image handling, on the generation lane: resize modes, mask blur and
inversion, "fill" of the masked area, "only masked" crops, and compositing the result back.

Written here because Pillow has the pieces (resize, blur, paste) but not AUTOMATIC1111's rules for
combining them.
"""

from __future__ import annotations

import dataclasses
import io

from .work import GenSpec


def _resize(img, mode: int, w: int, h: int, resample):
    """AUTOMATIC1111's resize modes: 0 stretch, 1 scale to cover and crop the middle, 2 scale to fit
    and fill the sides by stretching the edge rows or columns."""
    from PIL import Image

    if mode == 0 or img.size == (w, h):
        return img.resize((w, h), resample)
    iw, ih = img.size
    by_width = (mode == 1) == (w / h > iw / ih)  # crop: cover the target; fill: fit inside it
    sw, sh = (w, max(1, round(ih * w / iw))) if by_width else (max(1, round(iw * h / ih)), h)
    scaled = img.resize((sw, sh), resample)
    if mode == 1:
        left, top = (sw - w) // 2, (sh - h) // 2
        return scaled.crop((left, top, left + w, top + h))
    out = Image.new(img.mode, (w, h))
    x, y = (w - sw) // 2, (h - sh) // 2
    out.paste(scaled, (x, y))
    if sw < w:  # stretch the outer columns into the gaps
        if x > 0:
            out.paste(scaled.crop((0, 0, 1, sh)).resize((x, sh), resample), (0, 0))
        if w - x - sw > 0:
            out.paste(scaled.crop((sw - 1, 0, sw, sh)).resize((w - x - sw, sh), resample), (x + sw, 0))
    elif sh < h:
        if y > 0:
            out.paste(scaled.crop((0, 0, sw, 1)).resize((sw, y), resample), (0, 0))
        if h - y - sh > 0:
            out.paste(scaled.crop((0, sh - 1, sw, sh)).resize((sw, h - y - sh), resample), (0, y + sh))
    return out


def _fill_masked(img, mask):
    """AUTOMATIC1111's "fill": the masked area painted with ever less blurred colours from around it."""
    from PIL import Image, ImageFilter, ImageOps

    known = Image.new("RGBA", img.size, (0, 0, 0, 0))
    known.paste(img.convert("RGBA"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", img.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        # blur in premultiplied alpha, so unknown (transparent) pixels add no black
        layer = known.convert("RGBa").filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def _crop_box(mask, pad: int, w: int, h: int):
    """The masked area plus `pad` pixels, grown to the aspect of w x h and kept inside the image
    (AUTOMATIC1111's "only masked"); None for an empty mask."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    iw, ih = mask.size
    x1, y1, x2, y2 = max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, iw), min(box[3] + pad, ih)
    bw, bh = x2 - x1, y2 - y1
    if bw / bh < w / h:  # too narrow: widen
        grow = min(round(bh * w / h), iw) - bw
        x1 = min(max(x1 - grow // 2, 0), iw - bw - grow)
        x2 = x1 + bw + grow
    else:
        grow = min(round(bw * h / w), ih) - bh
        y1 = min(max(y1 - grow // 2, 0), ih - bh - grow)
        y2 = y1 + bh + grow
    return x1, y1, x2, y2


@dataclasses.dataclass
class Inpaint:
    """How an img2img request's images are prepared and its results composited."""

    resize_mode: int = 0
    blur: tuple[int, int] = (0, 0)
    invert: bool = False
    fill: bool = False
    only_masked: bool = False
    padding: int = 32

    def prepare(self, spec: GenSpec) -> dict:
        """Fit init image and mask to the generation size; returns what `finish` needs."""
        from PIL import Image, ImageOps

        w, h = spec.width, spec.height
        init, mask = spec.init_image, spec.mask
        state: dict = {"alpha": None, "box": None, "init": init, "base": None}
        if self.resize_mode and (mask is None or not self.only_masked):
            init = _resize(init, self.resize_mode, w, h, Image.LANCZOS)
        if mask is None:
            spec.init_image = init
            return state
        mask = mask.convert("L")
        if self.invert:
            mask = ImageOps.invert(mask)
        if self.blur != (0, 0):
            mask = _blur(mask, self.blur)
        box = _crop_box(mask, self.padding, w, h) if self.only_masked else None
        if box is not None:
            state["box"] = box
            init, mask = init.crop(box).resize((w, h), Image.LANCZOS), mask.crop(box).resize((w, h), Image.LANCZOS)
        elif self.resize_mode:
            mask = _resize(mask, self.resize_mode, w, h, Image.LANCZOS)
        if init.size != (w, h):  # as the pipeline fits them
            init, mask = init.resize((w, h), Image.BICUBIC), mask.resize((w, h), Image.NEAREST)
        if self.blur != (0, 0) or box is not None:
            # repaint wherever the blurred mask reaches; its soft edge fades the result into the picture
            state["alpha"], state["base"] = mask.point(lambda v: min(255, 2 * v)), init
            mask = mask.point(lambda v: 255 if v > 0 else 0)
        if self.fill:
            init = _fill_masked(init, mask.point(lambda v: 255 if v >= 128 else 0))
        spec.init_image, spec.mask = init, mask
        return state

    def finish(self, item: dict, state: dict) -> dict:
        from PIL import Image

        if state["alpha"] is None:
            return item
        out = Image.open(io.BytesIO(item["png"])).convert("RGB")
        if state["box"] is None:
            base = state["base"].copy()
            base.paste(out, (0, 0), state["alpha"])
            out = base
        else:  # "only masked": the repainted crop goes back into the whole init image
            x1, y1, x2, y2 = state["box"]
            size = (x2 - x1, y2 - y1)
            whole = state["init"].copy()
            whole.paste(out.resize(size, Image.LANCZOS), (x1, y1), state["alpha"].resize(size, Image.LANCZOS))
            out = whole
        return {**item, "png": png_with_parameters(out, item["parameters"])}


def _blur(mask, radii: tuple[int, int]):
    from PIL import ImageFilter

    rx, ry = radii
    if rx == ry:
        return mask.filter(ImageFilter.GaussianBlur(rx))
    # separable: one direction at a time
    m = mask.filter(ImageFilter.GaussianBlur((rx, 0))) if rx else mask
    return m.filter(ImageFilter.GaussianBlur((0, ry))) if ry else m


def png_with_parameters(img, parameters: str) -> bytes:
    from ..images import png_bytes

    img.info["parameters"] = parameters
    return png_bytes(img)
