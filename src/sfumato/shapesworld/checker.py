"""Scene checker: read a ShapesWorld image back into objects and judge it against a caption.

    from sfumato.shapesworld.checker import judge
    judge(image, "a red circle to the left of a blue square")  # -> Verdict(passed, reason)

`parse_image` segments an image of any resolution (geometry scales by R/64) into objects and
names each one by fitting the renderer's own anti-aliased templates (render._coverage); an
object that no template fits well is "unknown", never the nearest shape. `parse_prompt` reads
any caption of the SHAPESWORLD.md grammar, and `check` applies the GenEval-style rules: as many
objects as named, every named attribute holds, every named relation holds.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import permutations

import numpy as np
from PIL import Image

from . import spec
from .render import _coverage

UNKNOWN = "unknown"

# A pixel is foreground when some palette colour covers at least this share of it.
MASK_ALPHA = 0.5
# Components smaller than this (px at 64 px, scaled by area) are noise, not objects.
SPECK_AREA = 7.0
# A template fits when (sum|alpha - template| + stray paint) / sum(template) is at most this
# (mild blur and noise stay under 0.17), and beats every other template by MIN_FIT_MARGIN.
# Digits get more room: the shipped VAE redraws the blocky glyphs with rounded, thinner strokes,
# and at 0.26 a third of its reconstructions of digit renders went unread; at 0.35 (with
# MERGE_GAP 3) 0.93 are read, as for the other categories, and none passes under another digit's
# prompt (benchmarks/checker_calibration.py, docs/recipe.md).
MAX_FIT_ERROR = {"shape": 0.22, "digit": 0.35}
MIN_FIT_MARGIN = 0.05
# A shape is small or large when its side is within this share of 12 or 22 px.
SIZE_TOL = 0.15
# Paint further than this (in units of the object's contrast) from the line between background
# and object colour is stray: it counts against every template.
OFF_TOL = 0.3
# An object has a palette colour when its pixels lie within COLOR_TOL (RGB units, median) of
# the segment from the background to that colour, clearly nearer than to any other colour's,
# its fully covered pixels reach the colour, and most pixels agree.
COLOR_TOL = 30.0
COLOR_MARGIN = 0.6
COLOR_PURITY = 0.75
# Pieces closer than this (px at 64 px) whose union fits a glyph box are one object (a digit
# whose thin diagonal broke, cells that touch only at corners, a detached triangle apex). Two
# real objects never fit one glyph box: two small ones GAP apart span 26 px.
MERGE_GAP = 3.0
MERGE_SLACK = 2.0
# Blurs (px at 64 px) tried on the templates, so a softened image still fits its template.
BLURS = (0.0, 0.5, 0.8, 1.2)

_PALETTE_NAMES = tuple(spec.COLORS)
_PALETTE = np.array([spec.COLORS[c] for c in _PALETTE_NAMES], np.float32)
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / box area


# ---------------------------------------------------------------- results


@dataclass
class ParsedObject:
    """One object found in an image; geometry in 64-px units."""

    shape: str  # one of spec.SHAPES, "digit", or "unknown"
    color: str  # a palette colour or "unknown"
    size: str | None  # "small" | "large" | "unknown" (off-contract); None for digits and unknown shapes
    digit: int | None
    bbox: tuple[float, float, float, float]  # [x0, y0, x1, y1)
    center: tuple[float, float]
    confidence: float  # 1 - template fit error (0..1)
    area: float  # foreground pixels, in 64-px units

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParsedScene:
    background: str  # "black" | "white" | "gray" | "unknown"
    objects: list[ParsedObject]
    res: tuple[int, int]  # (width, height) of the image in px

    def to_dict(self) -> dict:
        return {"background": self.background, "res": list(self.res), "objects": [o.to_dict() for o in self.objects]}


@dataclass(frozen=True)
class ObjSpec:
    """What a caption says about one object; None means the caption leaves it free."""

    shape: str  # one of spec.SHAPES or "digit"
    color: str | None = None
    size: str | None = None
    digit: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PromptSpec:
    text: str
    objects: tuple[ObjSpec, ...]
    relation: str | None = None  # one of spec.RELATIONS; "objects[0] rel objects[1]"
    relation_phrase: str | None = None  # the words the caption used
    background: str | None = None

    def to_dict(self) -> dict:
        return {"text": self.text, "objects": [o.to_dict() for o in self.objects], "relation": self.relation,
                "relation_phrase": self.relation_phrase, "background": self.background}


@dataclass
class Verdict:
    passed: bool
    reason: str
    scene: ParsedScene | None = field(default=None, repr=False)
    prompt: PromptSpec | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason,
                "scene": self.scene.to_dict() if self.scene else None,
                "prompt": self.prompt.to_dict() if self.prompt else None}


# ---------------------------------------------------------------- segmentation


def _to_array(img) -> np.ndarray:
    """An (H, W, 3) float32 array in 0..255 from a PIL image or a uint8/float array."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), np.float32)
    raw = np.asarray(img)
    a = np.repeat(raw[:, :, None], 3, axis=2) if raw.ndim == 2 else raw
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 8:
        raise ValueError(f"expected an RGB image array of shape (H, W, 3), at least 8 px a side; got {raw.shape}")
    a = a[:, :, :3].astype(np.float32)
    if np.issubdtype(raw.dtype, np.floating) and a.max() <= 1.0:
        a = a * 255.0  # float images in 0..1
    return a


def _hook(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of an n-node graph with edges (a, b): the smallest node of each."""
    parent = np.arange(n)
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            return parent
        lo, hi = np.minimum(pa[diff], pb[diff]), np.maximum(pa[diff], pb[diff])
        np.minimum.at(parent, hi, lo)  # hook the larger root under the smaller one
        while True:  # pointer jumping until every node points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask via row runs; labels 1..n (0 = background)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    r0, c0 = np.nonzero(d == 1)
    _, c1 = np.nonzero(d == -1)  # exclusive run ends, in the same order as the starts
    labels = np.zeros(h * w, np.int32)
    n = len(r0)
    if n == 0:
        return labels.reshape(h, w), 0
    k = w + 2
    # Runs j on the next row touch run i (8-connected) when c0[j] <= c1[i] and c1[j] >= c0[i].
    lo = np.searchsorted(r0 * k + c1, (r0 + 1) * k + c0, side="left")
    hi = np.searchsorted(r0 * k + c0, (r0 + 1) * k + c1, side="right")
    cnt = np.maximum(hi - lo, 0)
    ii = np.repeat(np.arange(n), cnt)
    jj = np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    _, comp = np.unique(_hook(n, ii, jj), return_inverse=True)
    lengths = c1 - c0
    starts = r0 * w + c0
    idx = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    labels[idx] = np.repeat(comp + 1, lengths)
    return labels.reshape(h, w), int(comp.max()) + 1


def _boxes(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label area and [x0, y0, x1, y1) pixel boxes for labels 1..n."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs] - 1
    area = np.bincount(lab, minlength=n)
    box = np.empty((n, 4), np.int64)
    box[:, :2] = np.iinfo(np.int64).max
    box[:, 2:] = -1
    np.minimum.at(box[:, 0], lab, xs)
    np.minimum.at(box[:, 1], lab, ys)
    np.maximum.at(box[:, 2], lab, xs + 1)
    np.maximum.at(box[:, 3], lab, ys + 1)
    return area, box


def _merge_pieces(labels: np.ndarray, n: int, sx: float, sy: float) -> tuple[np.ndarray, int]:
    """Merge components a px or so apart whose union fits a glyph box (digit cells that touch
    only at corners, a detached apex); two real objects never fit one glyph box together."""
    area, box = _boxes(labels, n)
    pieces = [i for i in range(n) if area[i] >= SPECK_AREA / 2 * sx * sy]
    if len(pieces) < 2 or len(pieces) > 64:  # nothing to merge, or a noise field no merge can rescue
        return labels, n
    gap_x, gap_y = MERGE_GAP * max(sx, 1.0), MERGE_GAP * max(sy, 1.0)
    wmax, hmax = (spec.DIGIT_BOX[0] + MERGE_SLACK) * sx, (spec.DIGIT_BOX[1] + MERGE_SLACK) * sy
    remap = np.arange(n + 1)
    merged = True
    while merged:
        merged = False
        for i in pieces:
            for j in pieces:
                bi, bj = box[i], box[j]
                u = (min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3]))
                if (i < j and max(bj[0] - bi[2], bi[0] - bj[2]) <= gap_x and max(bj[1] - bi[3], bi[1] - bj[3]) <= gap_y
                        and u[2] - u[0] <= wmax and u[3] - u[1] <= hmax):
                    box[i] = u
                    remap[remap == j + 1] = i + 1
                    pieces.remove(j)
                    merged = True
                    break
            if merged:
                break
    if (remap == np.arange(n + 1)).all():
        return labels, n
    _, dense = np.unique(remap, return_inverse=True)  # keeps 0 -> 0, renumbers the rest densely
    return dense[labels].astype(np.int32), int(dense.max())


def _pad1(m: np.ndarray) -> np.ndarray:
    p = np.zeros((m.shape[0] + 2, m.shape[1] + 2), bool)
    p[1:-1, 1:-1] = m
    return p


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by r px with a 3x3 (8-neighbour) structuring element, r times."""
    for _ in range(r):
        p = _pad1(m)
        rows = p[:, :-2] | p[:, 1:-1] | p[:, 2:]
        m = rows[:-2] | rows[1:-1] | rows[2:]
    return m


def _erode4(m: np.ndarray) -> np.ndarray:
    """Pixels of m whose four neighbours are all in m."""
    p = _pad1(m)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


# ---------------------------------------------------------------- naming objects


def _object_color(d: np.ndarray, bg: np.ndarray) -> str:
    """The palette colour whose background-to-colour segment the pixels d (= pixel - background,
    shape (N, 3)) lie on, whatever their coverage; "unknown" when no segment is near, two are
    about as near, the fully covered pixels are too dim, or the pixels disagree."""
    v = _PALETTE - bg
    raw = np.clip(d @ v.T / (v * v).sum(axis=1), 0.0, 1.25)  # (N, 6) coverage along each colour's segment
    res = np.sqrt(((d[:, None, :] - raw[..., None] * v[None]) ** 2).sum(axis=2))  # distance off it
    score = np.median(res, axis=0)
    i, j = np.argsort(score)[:2]
    peak = np.percentile(raw[:, i], 90)
    if (score[i] > COLOR_TOL or score[i] > COLOR_MARGIN * score[j] or peak < 0.8
            or (res[:, i] <= 1.5 * COLOR_TOL).mean() < COLOR_PURITY):
        return UNKNOWN
    return _PALETTE_NAMES[i]


_CENTROIDS: dict[tuple, tuple[float, float]] = {}


def _template_centroid(shape: str, digit: int | None, bw: float, bh: float) -> tuple[float, float]:
    """Centroid of a template's coverage relative to its box origin, in px."""
    key = (shape, digit, bw, bh)
    if key not in _CENTROIDS:
        t = _coverage(shape, digit, bw, bh, 0.0, 0.0)
        ys, xs = np.indices(t.shape)
        m = t.sum()
        _CENTROIDS[key] = (float((t * (xs + 0.5)).sum() / m), float((t * (ys + 0.5)).sum() / m))
    return _CENTROIDS[key]


@lru_cache(maxsize=4096)
def _template(shape: str, digit: int | None, bw: float, bh: float, fx: float, fy: float,
              sigma: float) -> tuple[np.ndarray, int]:
    """The renderer's coverage for a box at offset (fx, fy), Gaussian-blurred by sigma px; (array, pad)."""
    t = _coverage(shape, digit, bw, bh, fx, fy)
    if sigma == 0:
        return t, 0
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    t = np.pad(t, r)
    h, w = t.shape
    rows = sum(k[i] * np.pad(t, ((0, 0), (r, r)))[:, i : i + w] for i in range(2 * r + 1))
    return sum(k[i] * np.pad(rows, ((r, r), (0, 0)))[i : i + h] for i in range(2 * r + 1)).astype(np.float32), r


def _place(centroid: tuple[float, float], shape: str, digit: int | None, bw: float, bh: float):
    """Box (x0, y0, w, h) in px of a template whose centroid sits on the object's centroid."""
    tcx, tcy = _template_centroid(shape, digit, bw, bh)
    # 1/8 px steps keep the template cache small.
    return round((centroid[0] - tcx) * 8) / 8, round((centroid[1] - tcy) * 8) / 8, bw, bh


def _snap_size(d: float) -> str:
    """The contract size a box side d (64-px units) is, or "unknown" between or beyond them."""
    for name, side in spec.SIZES.items():
        if abs(d - side) <= SIZE_TOL * side:
            return name
    return UNKNOWN


def _fit_error(alpha: np.ndarray, wx0: int, wy0: int, cand: tuple, box: tuple, sigma: float,
               stray: float = 0.0) -> float:
    """(sum|alpha - template| + stray paint) / sum(template), (blurred) template at box, window at wx0, wy0."""
    x0, y0, bw, bh = box
    ix, iy = int(np.floor(x0)), int(np.floor(y0))
    t, r = _template(cand[0], cand[1], bw, bh, x0 - ix, y0 - iy, sigma)
    # Paste the template into the window; template mass falling outside it counts as missing.
    h, w = alpha.shape
    ox, oy = ix - r - wx0, iy - r - wy0
    a0, a1 = max(oy, 0), min(oy + t.shape[0], h)
    b0, b1 = max(ox, 0), min(ox + t.shape[1], w)
    placed = np.zeros_like(alpha)
    if a0 < a1 and b0 < b1:
        placed[a0:a1, b0:b1] = t[a0 - oy : a1 - oy, b0 - ox : b1 - ox]
    total = t.sum()
    return float((np.abs(alpha - placed).sum() + total - placed.sum() + stray) / total)


def _name_object(img, bg, labels, k, box, area, sx, sy) -> ParsedObject:
    """Colour, shape, size and digit of component k by template fitting."""
    hh, ww = labels.shape
    pad = max(2, int(np.ceil(2 * max(sx, sy))))
    wx0, wy0 = max(box[0] - pad, 0), max(box[1] - pad, 0)
    wx1, wy1 = min(box[2] + pad, ww), min(box[3] + pad, hh)
    lab = labels[wy0:wy1, wx0:wx1]
    px = img[wy0:wy1, wx0:wx1]
    mine = lab == k
    # Support: this component plus its faint rim, never a neighbour's pixels.
    support = _dilate(mine, max(1, int(round(max(sx, sy))))) & ~_dilate((lab != 0) & ~mine, 1)
    color = _object_color(px[mine] - bg, bg)
    if color != UNKNOWN:
        ref = _PALETTE[_PALETTE_NAMES.index(color)]
    else:  # off-palette paint: its own colour, from pixels well inside the blob
        core = _erode4(mine)
        ref = np.median(px[core if core.sum() >= 3 else mine], axis=0)
    # Coverage of the object's colour over the background, and paint that is no mix of the two
    # (another colour bleeding in, a two-tone blob), which no template explains.
    v = ref - bg
    area64 = float(area) / (sx * sy)
    ext = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
    if float(v @ v) < 1.0:  # paint indistinguishable from the background: nothing to fit
        return ParsedObject(UNKNOWN, color, None, None, tuple(round(c, 2) for c in ext),
                            (round((ext[0] + ext[2]) / 2, 2), round((ext[1] + ext[3]) / 2, 2)), 0.0, round(area64, 1))
    d = px - bg
    raw = (d @ v) / float(v @ v)
    off = np.sqrt(((d - raw[..., None] * v) ** 2).sum(axis=2) / float(v @ v))
    alpha = np.clip(raw, 0.0, 1.0) * support
    stray = float((np.clip(off - OFF_TOL, 0.0, 1.0) * support).sum())

    # Candidates: each shape at the side its coverage implies (the size is that side snapped to a
    # contract size, or "unknown"), and each digit glyph when the extent allows; all placed by
    # centroid.
    mass = alpha.sum()
    if mass <= 0:  # nothing of its own colour: cannot be placed
        return ParsedObject(UNKNOWN, color, None, None, tuple(round(c, 2) for c in ext),
                            (round((ext[0] + ext[2]) / 2, 2), round((ext[1] + ext[3]) / 2, 2)), 0.0, round(area64, 1))
    ys, xs = np.indices(alpha.shape)
    centroid = (wx0 + (alpha * (xs + 0.5)).sum() / mass, wy0 + (alpha * (ys + 0.5)).sum() / mass)
    fits = []  # (error, (shape, digit), size, box)
    for shape, fill in _FILL.items():
        side = float(np.sqrt(mass / (sx * sy) / fill))  # 64-px units
        size = _snap_size(side)
        if size != UNKNOWN and abs(side - spec.SIZES[size]) <= 0.04 * spec.SIZES[size]:
            side = spec.SIZES[size]  # as drawn by the renderer, up to noise
        bw, bh = max(round(side * sx * 4) / 4, 1.0), max(round(side * sy * 4) / 4, 1.0)  # 1/4 px steps
        fits.append([0.0, (shape, None), size, _place(centroid, shape, None, bw, bh)])
    ext_w, ext_h = (box[2] - box[0]) / sx, (box[3] - box[1]) / sy
    if abs(ext_h - spec.DIGIT_BOX[1]) <= 6 and ext_w <= spec.DIGIT_BOX[0] + 6:
        bw, bh = spec.DIGIT_BOX[0] * sx, spec.DIGIT_BOX[1] * sy
        fits += [[0.0, ("digit", g), None, _place(centroid, "digit", g, bw, bh)] for g in spec.DIGIT_GLYPHS]
    for f in fits:
        f[0] = _fit_error(alpha, wx0, wy0, f[1], f[3], 0.0, stray)
    # Estimate the image's blur with the sharp-best template, then rank every candidate at it.
    fits.sort(key=lambda f: f[0])
    blur = min(sx, sy)
    sigma = min(BLURS, key=lambda b: _fit_error(alpha, wx0, wy0, fits[0][1], fits[0][3], b * blur, stray))
    if sigma:
        for f in fits:
            f[0] = _fit_error(alpha, wx0, wy0, f[1], f[3], sigma * blur, stray)
        fits.sort(key=lambda f: f[0])
    err, (shape, digit), size, (x0, y0, bw, bh) = fits[0]
    limit = MAX_FIT_ERROR["digit" if shape == "digit" else "shape"]
    if err > limit or fits[1][0] - err < MIN_FIT_MARGIN:  # nothing fits, or two things fit alike
        return ParsedObject(UNKNOWN, color, None, None, tuple(round(c, 2) for c in ext),
                            (round((ext[0] + ext[2]) / 2, 2), round((ext[1] + ext[3]) / 2, 2)),
                            round(max(0.0, 1.0 - err), 3), round(area64, 1))
    bb = (x0 / sx, y0 / sy, (x0 + bw) / sx, (y0 + bh) / sy)
    return ParsedObject(shape, color, size, digit, tuple(round(c, 2) for c in bb),
                        (round((bb[0] + bb[2]) / 2, 2), round((bb[1] + bb[3]) / 2, 2)),
                        round(1.0 - err, 3), round(area64, 1))


def parse_image(img: Image.Image | np.ndarray) -> ParsedScene:
    """Read the background and the objects of a ShapesWorld-style image of any resolution.

    Args:
        img: a PIL image or an (H, W, 3) array (uint8, or float in 0..1 or 0..255).

    Returns:
        A ParsedScene; objects are listed top to bottom, then left to right. An object no
        template fits has shape "unknown"; a colour off the palette is "unknown".
    """
    a = _to_array(img)
    hh, ww = a.shape[:2]
    sx, sy = ww / spec.BASE_RES, hh / spec.BASE_RES
    # Background: nearest background colour to the median of the border ring (objects keep
    # MARGIN px away from the edge).
    r = max(1, int(spec.MARGIN * min(sx, sy)))
    ring = np.concatenate([a[:r].reshape(-1, 3), a[-r:].reshape(-1, 3),
                           a[:, :r].reshape(-1, 3), a[:, -r:].reshape(-1, 3)])
    med = np.median(ring, axis=0)
    names = tuple(spec.BACKGROUNDS)
    bgs = np.array([spec.BACKGROUNDS[b] for b in names], np.float32)
    bi = int(np.argmin(((bgs - med) ** 2).sum(axis=1)))
    bg = bgs[bi]
    # Foreground: at least half covered by some palette colour, or far from the background in
    # any direction (off-palette paint). Coverage, not distance, keeps the faint rims of two
    # bright objects 2 px apart from joining them.
    v = _PALETTE - bg
    alpha = ((a - bg) @ v.T / (v * v).sum(axis=1)).max(axis=2)
    dist = np.sqrt(((a - bg) ** 2).sum(axis=2))
    contrast = float(np.sqrt((v * v).sum(axis=1)).min())
    mask = (alpha >= MASK_ALPHA) | (dist > contrast)
    ring_ok = np.sqrt(((ring - bg) ** 2).sum(axis=1)) <= MASK_ALPHA * contrast
    background = names[bi] if ring_ok.mean() >= 0.5 else UNKNOWN

    labels, n = _label(mask)
    labels, n = _merge_pieces(labels, n, sx, sy)
    area, box = _boxes(labels, n)
    objects = []
    for k in range(1, n + 1):
        if area[k - 1] < SPECK_AREA * sx * sy:
            continue
        objects.append(_name_object(a, bg, labels, k, box[k - 1], area[k - 1], sx, sy))
    objects.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return ParsedScene(background, objects, (ww, hh))


# ---------------------------------------------------------------- prompts


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SIZE, _COLOR, _SHAPE = _alt(spec.WORD_SIZE), _alt(spec.COLORS), _alt(spec.SHAPES)
_NP = rf"an? (?:({_SIZE}) )?(?:({_COLOR}) )?({_SHAPE})"
_RE_BG = re.compile(rf"^(.*) on a ({_alt(spec.BACKGROUNDS)}) background$")
_RE_SINGLE = re.compile(rf"^{_NP}$")
_RE_AND = re.compile(rf"^{_NP} and {_NP}$")
_RE_REL = re.compile(rf"^{_NP} ({_alt(spec.WORD_RELATION)}) {_NP}$")
_RE_COUNT = re.compile(rf"^({_alt(spec.NUMBERS)}) (?:({_SIZE}) )?({_COLOR}) ({_alt(spec.SINGULARS)})$")
_RE_DIGIT_IN = re.compile(rf"^the digit ([0-9])(?: in ({_COLOR}))?$")
_RE_DIGIT_A = re.compile(rf"^an? ({_COLOR}) digit ([0-9])$")
_VOCAB = set(" ".join([*spec.WORD_SIZE, *spec.COLORS, *spec.SHAPES, *spec.SINGULARS, *spec.WORD_RELATION,
                       *spec.NUMBERS, *spec.BACKGROUNDS, "a an and the digit in on background",
                       *map(str, spec.DIGIT_GLYPHS)]).split())
_FORMS = ("'a [size] [color] shape', 'NP and NP', 'NP <relation> NP', 'two|three|four [size] color shapes', "
          "'the digit K [in color]', 'a color digit K', each optionally ending ' on a black|white|gray background'")


def _obj(size_word, color, shape) -> ObjSpec:
    return ObjSpec(shape, color, spec.WORD_SIZE[size_word] if size_word else None)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a caption of the ShapesWorld grammar (SHAPESWORLD.md) into what it claims.

    Case and surrounding or repeated spaces are ignored, and "an" is accepted for "a".

    Raises:
        ValueError: the text is not a caption of the grammar; the message names the first
            unknown word when there is one.
    """
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}")
    t = " ".join(text.lower().split())
    if not t:
        raise ValueError("empty caption; expected one of the forms " + _FORMS)
    background = None
    m = _RE_BG.match(t)
    body = t
    if m:
        body, background = m.group(1), m.group(2)
    if m := _RE_SINGLE.match(body):
        return PromptSpec(t, (_obj(*m.groups()),), background=background)
    if m := _RE_AND.match(body):
        g = m.groups()
        return PromptSpec(t, (_obj(*g[:3]), _obj(*g[3:])), background=background)
    if m := _RE_REL.match(body):
        g = m.groups()
        return PromptSpec(t, (_obj(*g[:3]), _obj(*g[4:])), spec.WORD_RELATION[g[3]], g[3], background)
    if m := _RE_COUNT.match(body):
        num, size_word, color, plural = m.groups()
        o = _obj(size_word, color, spec.SINGULARS[plural])
        return PromptSpec(t, (o,) * spec.NUMBERS[num], background=background)
    if m := _RE_DIGIT_IN.match(body):
        return PromptSpec(t, (ObjSpec("digit", m.group(2), None, int(m.group(1))),), background=background)
    if m := _RE_DIGIT_A.match(body):
        return PromptSpec(t, (ObjSpec("digit", m.group(1), None, int(m.group(2))),), background=background)
    unknown = [w for w in t.split() if w not in _VOCAB]
    if unknown:
        raise ValueError(f"not a ShapesWorld caption: unknown word {unknown[0]!r} in {text!r}; "
                         f"expected one of the forms {_FORMS}")
    raise ValueError(f"not a ShapesWorld caption: {text!r} does not fit the grammar; "
                     f"expected one of the forms {_FORMS}")


# ---------------------------------------------------------------- judging


_REL_TEXT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def _noun(shape: str, digit: int | None, n: int) -> str:
    if shape == "digit":
        return f"digit{'s' if n > 1 else ''} {digit}"
    if shape == UNKNOWN:
        return f"unrecognised object{'s' if n > 1 else ''}"
    return spec.PLURALS[shape] if n > 1 else shape


def _describe(o, show_size: bool, show_color: bool) -> tuple:
    """The attributes of an object (parsed or named) that a description shows."""
    if o.shape == UNKNOWN:
        return (None, None, UNKNOWN, None)
    size = o.size if show_size and o.shape != "digit" else None
    color = ("off-palette" if o.color == UNKNOWN else o.color) if show_color else None
    return (size, color, o.shape, o.digit)


def _phrase(descs: list[tuple]) -> str:
    """'2 red squares and 1 red circle' from described objects ('nothing' when empty)."""
    if not descs:
        return "nothing"
    parts = []
    for (size, color, shape, digit), n in Counter(descs).items():
        words = [str(n)] + [w for w in (size, color) if w] + [_noun(shape, digit, n)]
        parts.append(" ".join(words))
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _mismatches(o: ParsedObject, want: ObjSpec) -> int:
    if o.shape != want.shape:
        return 3
    bad = want.color is not None and o.color != want.color
    bad += want.size is not None and o.size != want.size
    bad += want.digit is not None and o.digit != want.digit
    return int(bad)


def _relation(a: ParsedObject, b: ParsedObject, rel: str) -> str:
    """'' when 'a rel b' holds (right sign along the axis, axis dominant), else where a really is."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    if along > 0 and abs(along) >= abs(across) / 2:
        return ""
    if abs(dx) >= abs(dy):
        where = "left of" if dx > 0 else "right of"
    else:
        where = "above" if dy > 0 else "below"
    return f"{where} {{b}} (dx={dx:+.1f}, dy={dy:+.1f})"


def _name(o: ObjSpec) -> str:
    words = [w for w in (o.size, o.color) if w] + [_noun(o.shape, o.digit, 1)]
    return "the " + " ".join(words)


def check(scene: ParsedScene, prompt: PromptSpec) -> Verdict:
    """Judge a parsed scene against a parsed caption (GenEval-style rules, SHAPESWORLD.md).

    Passes when the background (if named) matches, no object is unrecognised, the object count
    equals the number named, some assignment of objects to named objects satisfies every named
    attribute, and for a relation the first named object stands on the named side of the second.
    """
    def done(ok: bool, reason: str) -> Verdict:
        return Verdict(ok, reason, scene, prompt)

    reasons = []
    if prompt.background is not None and scene.background != prompt.background:
        reasons.append(f"expected background {prompt.background}, found {scene.background}")
    show_size = any(o.size for o in prompt.objects)
    show_color = any(o.color for o in prompt.objects)
    want = [_describe(o, show_size, show_color) for o in prompt.objects]
    found = [_describe(o, show_size, show_color) for o in scene.objects]
    unknown = [o for o in scene.objects if o.shape == UNKNOWN]
    if unknown:
        where = ", ".join(f"({o.center[0]:.0f}, {o.center[1]:.0f})" for o in unknown)
        reasons.append(f"{len(unknown)} unrecognised object{'s' if len(unknown) > 1 else ''} at {where} "
                       f"(best fit {max(o.confidence for o in unknown):.2f})")
    for o in scene.objects:
        if o.shape in spec.SHAPES and o.size not in spec.SIZES:
            reasons.append(f"a {o.shape} at ({o.center[0]:.0f}, {o.center[1]:.0f}) is {o.bbox[2] - o.bbox[0]:.1f} px "
                           f"wide, neither small ({spec.SIZES['small']}) nor large ({spec.SIZES['large']})")
    n, m = len(prompt.objects), len(scene.objects)
    if m != n:
        reasons.append(f"expected {n} object{'s' if n > 1 else ''} ({_phrase(want)}), "
                       f"found {m}" + (f" ({_phrase(found)})" if m else ""))
    if reasons:
        return done(False, "; ".join(reasons))

    best = None  # (attribute mismatches, relation failed), relation message of the best assignment
    for perm in permutations(scene.objects):
        bad = sum(_mismatches(o, w) for o, w in zip(perm, prompt.objects))
        rel_msg = _relation(perm[0], perm[1], prompt.relation) if prompt.relation else ""
        if bad == 0 and not rel_msg:
            held = f", {_REL_TEXT[prompt.relation]} as named" if prompt.relation else ""
            return done(True, f"found {_phrase(found)}{held}")
        if best is None or (bad, bool(rel_msg)) < best[0]:
            best = ((bad, bool(rel_msg)), rel_msg)
    (bad, _), rel_msg = best
    if bad:
        return done(False, f"expected {_phrase(want)}, found {_phrase(found)}")
    a, b = prompt.objects[:2]
    return done(False, f"{prompt.relation_phrase!r}: {_name(a)} is " + rel_msg.format(b=_name(b)))


def judge(img: Image.Image | np.ndarray, prompt: str) -> Verdict:
    """Parse an image and a caption and judge one against the other (see check)."""
    return check(parse_image(img), parse_prompt(prompt))
