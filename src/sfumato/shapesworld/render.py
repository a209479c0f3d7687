"""ShapesWorld scenes: sample a scene for a category, caption it, render it.

Every scene is a pure function of (seed, index), so a data set can be generated in shards,
streamed without touching disk, or regenerated bit for bit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from . import spec

# Probability that a caption states an attribute it may omit.
P_SAY_SIZE = 0.5
P_SAY_COLOR = 0.7
P_SAY_BACKGROUND = 0.3


@dataclass
class Obj:
    shape: str  # one of spec.SHAPES, or "digit"
    color: str
    size: str | None  # "small" | "large"; None for digits
    digit: int | None = None
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # [x0, y0, x1, y1) in 64-px units

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def box_size(self) -> tuple[int, int]:
        return spec.DIGIT_BOX if self.shape == "digit" else (spec.SIZES[self.size],) * 2

    def to_record(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "digit": self.digit,
            "bbox": list(self.bbox),
            "center": list(self.center),
        }


@dataclass
class Scene:
    background: str
    objects: list[Obj]
    category: str
    caption: str = ""
    meta: dict = field(default_factory=dict)

    def to_record(self, res: int = spec.BASE_RES) -> dict:
        return {
            "size": res,
            "background": self.background,
            "caption": self.caption,
            "category": self.category,
            "objects": [o.to_record() for o in self.objects],
        }


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=8192)
def _coverage(shape: str, digit: int | None, bw: float, bh: float, fx: float, fy: float) -> np.ndarray:
    """Anti-aliased coverage (h, w) of one shape whose box starts at fractional offset (fx, fy)."""
    ss = spec.SUPERSAMPLE
    pw, ph = int(np.ceil(fx + bw)), int(np.ceil(fy + bh))
    xs = (np.arange(pw * ss) + 0.5) / ss  # sub-pixel centres, patch coordinates
    ys = (np.arange(ph * ss) + 0.5) / ss
    u = ((xs - fx) / bw)[None, :]  # box-normalised, 0..1 across the box
    v = ((ys - fy) / bh)[:, None]
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        m = np.ones_like(inside)
    elif shape == "triangle":
        m = np.abs(u - 0.5) <= v / 2
    elif shape == "cross":
        m = (np.abs(u - 0.5) < 1 / 6) | (np.abs(v - 0.5) < 1 / 6)
    elif shape == "digit":
        glyph = np.array([[c == "1" for c in row] for row in spec.DIGIT_GLYPHS[digit]])
        col = np.clip((u * 5).astype(int), 0, 4)
        row = np.clip((v * 7).astype(int), 0, 6)
        m = glyph[row, col]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = (m & inside).astype(np.float32)
    # Box-filter downsample: mean over each SUPERSAMPLE x SUPERSAMPLE block.
    return m.reshape(ph, ss, pw, ss).mean(axis=(1, 3))


def render(scene: Scene, res: int = spec.BASE_RES) -> Image.Image:
    """Draw a scene at res x res pixels (geometry scaled by res/64)."""
    scale = res / spec.BASE_RES
    canvas = np.empty((res, res, 3), np.float32)
    canvas[:] = spec.BACKGROUNDS[scene.background]
    for o in scene.objects:
        x0, y0, x1, y1 = (c * scale for c in o.bbox)
        ix, iy = int(np.floor(x0)), int(np.floor(y0))
        a = _coverage(o.shape, o.digit, x1 - x0, y1 - y0, round(x0 - ix, 4), round(y0 - iy, 4))
        h, w = a.shape
        h, w = min(h, res - iy), min(w, res - ix)
        a = a[:h, :w, None]
        patch = canvas[iy : iy + h, ix : ix + w]
        patch += (np.asarray(spec.COLORS[o.color], np.float32) - patch) * a
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- placement


def _free_positions(w: int, h: int, placed: list[Obj]) -> tuple[np.ndarray, np.ndarray]:
    """All top-left corners (x0, y0) where a w x h box fits without touching placed boxes."""
    xs = np.arange(spec.MARGIN, spec.BASE_RES - spec.MARGIN - w + 1)
    ys = np.arange(spec.MARGIN, spec.BASE_RES - spec.MARGIN - h + 1)
    ok = np.ones((len(ys), len(xs)), bool)
    for p in placed:
        px0, py0, px1, py1 = p.bbox
        # Conflict unless the gap is >= GAP on at least one axis.
        cx = (xs < px1 + spec.GAP) & (px0 < xs + w + spec.GAP)
        cy = (ys < py1 + spec.GAP) & (py0 < ys + h + spec.GAP)
        ok &= ~(cy[:, None] & cx[None, :])
    yy, xx = np.nonzero(ok)
    return xs[xx], ys[yy]


def _relation_ok(rel: str, a: Obj, bx: np.ndarray, by: np.ndarray, bw: int, bh: int) -> np.ndarray:
    """Mask of B positions that make 'A rel B' true with the generator's margin (SHAPESWORLD.md)."""
    ax, ay = a.center
    dx = bx + bw / 2 - ax
    dy = by + bh / 2 - ay
    if rel == "left":
        along, across = dx, dy
    elif rel == "right":
        along, across = -dx, dy
    elif rel == "above":
        along, across = dy, dx
    else:
        along, across = -dy, dx
    return (along >= spec.RELATION_MIN_OFFSET) & (abs(across) <= along / 2)


def _apart(x: int, y: int, w: int, h: int, placed: list[Obj]) -> bool:
    for px0, py0, px1, py1 in (p.bbox for p in placed):
        if x < px1 + spec.GAP and px0 < x + w + spec.GAP and y < py1 + spec.GAP and py0 < y + h + spec.GAP:
            return False
    return True


def place(rng: random.Random, objects: list[Obj], relation: str | None = None) -> bool:
    """Give each object a bbox in order; False if the layout dead-ends (caller retries)."""
    placed: list[Obj] = []
    for i, o in enumerate(objects):
        w, h = o.box_size
        related = relation is not None and i == 1
        hi_x, hi_y = spec.BASE_RES - spec.MARGIN - w, spec.BASE_RES - spec.MARGIN - h
        # A few cheap random draws usually succeed; enumerate every free spot only when they don't.
        for _ in range(16):
            x, y = rng.randint(spec.MARGIN, hi_x), rng.randint(spec.MARGIN, hi_y)
            if _apart(x, y, w, h, placed) and (not related or _relation_ok(relation, placed[0], x, y, w, h)):
                break
        else:
            xs, ys = _free_positions(w, h, placed)
            if related:
                keep = _relation_ok(relation, placed[0], xs, ys, w, h)
                xs, ys = xs[keep], ys[keep]
            if len(xs) == 0:
                return False
            j = rng.randrange(len(xs))
            x, y = int(xs[j]), int(ys[j])
        o.bbox = (x, y, x + w, y + h)
        placed.append(o)
    return True


# ---------------------------------------------------------------- scenes and captions


def _np(rng: random.Random, o: Obj, say_size: bool, say_color: bool) -> str:
    words = ["a"]
    if say_size:
        words.append(rng.choice(spec.SIZE_WORDS[o.size]))
    if say_color:
        words.append(o.color)
    words.append(o.shape)
    return " ".join(words)


def _coin(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def sample_scene(rng: random.Random, category: str) -> Scene:
    """Sample a scene of one evaluation category with a caption from the grammar."""
    if category not in spec.CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(spec.CATEGORIES)}")
    bg = rng.choice(tuple(spec.BACKGROUNDS))
    colors, shapes = tuple(spec.COLORS), spec.SHAPES

    def obj(shape=None, color=None, size=None) -> Obj:
        return Obj(shape or rng.choice(shapes), color or rng.choice(colors), size or rng.choice(("small", "large")))

    relation = None
    say_bg = _coin(rng, P_SAY_BACKGROUND)
    if category in ("single_object", "colors", "size", "background"):
        objs = [obj()]
        say_size = category == "size" or _coin(rng, P_SAY_SIZE)
        say_color = category in ("colors", "background") or _coin(rng, P_SAY_COLOR)
        say_bg = say_bg or category == "background"
        scene_text = _np(rng, objs[0], say_size, say_color)
    elif category in ("two_objects", "attribute_binding", "position"):
        s1, s2 = rng.sample(shapes, 2)
        if category == "attribute_binding":
            c1, c2 = rng.sample(colors, 2)
            objs = [obj(s1, c1), obj(s2, c2)]
        else:
            objs = [obj(s1), obj(s2)]
        must_color = category == "attribute_binding"
        parts = [_np(rng, o, _coin(rng, P_SAY_SIZE), must_color or _coin(rng, P_SAY_COLOR)) for o in objs]
        if category == "position":
            relation = rng.choice(spec.RELATIONS)
            scene_text = f"{parts[0]} {rng.choice(spec.RELATION_WORDS[relation])} {parts[1]}"
        else:
            scene_text = f"{parts[0]} and {parts[1]}"
    elif category == "counting":
        n = rng.randint(2, spec.MAX_OBJECTS)
        shape, color = rng.choice(shapes), rng.choice(colors)
        say_size = _coin(rng, P_SAY_SIZE)
        size = rng.choice(("small", "large"))
        # An unstated size is free, so each object draws its own.
        objs = [obj(shape, color, size if say_size else None) for _ in range(n)]
        size_word = rng.choice(spec.SIZE_WORDS[size]) + " " if say_size else ""
        scene_text = f"{spec.NUMBER_WORDS[n]} {size_word}{color} {spec.PLURALS[shape]}"
    else:  # text
        d, color = rng.randrange(10), rng.choice(colors)
        objs = [Obj("digit", color, None, d)]
        form = rng.randrange(3)
        scene_text = (f"the digit {d}", f"the digit {d} in {color}", f"a {color} digit {d}")[form]

    for _ in range(100):
        if place(rng, objs, relation):
            break
    else:  # pragma: no cover - every category fits easily on the canvas
        raise RuntimeError(f"could not place {len(objs)} objects")
    caption = scene_text + (f" on a {bg} background" if say_bg else "")
    return Scene(bg, objs, category, caption, {"relation": relation})


def scene_rng(seed: int, index: int) -> random.Random:
    """The RNG of scene `index` in the data set with `seed` (string seeding is stable across runs)."""
    return random.Random(f"shapesworld-v1/{seed}/{index}")


def make_scene(seed: int, index: int, categories: tuple[str, ...] = spec.CATEGORIES) -> Scene:
    """Scene `index` of a data set; categories take turns so every one is represented."""
    return sample_scene(scene_rng(seed, index), categories[index % len(categories)])
