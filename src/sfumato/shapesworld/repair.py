"""Repair a scene whose objects are right and whose named relation is not: the nearest render that
holds the relation, for training on corrected copies of a model's own samples (`sfumato tune
--objective repair`).

The objects keep their parsed shape, colour, size and background; one of the two related objects
stays where it was drawn and the other moves the least distance that puts it on the named side with
the generator's margin (SHAPESWORLD.md), whichever of the two moves less; when neither can, the two
trade places along the relation's axis.
"""

from __future__ import annotations

import dataclasses
from itertools import permutations

import numpy as np
from PIL import Image

from . import spec
from .checker import ParsedObject, ParsedScene, PromptSpec, _mismatches, check, parse_image
from .render import Obj, Scene, _free_positions, _relation_ok, render

CONVERSE = spec.OPPOSITE  # "a rel b" read from b's side


def _as_obj(o: ParsedObject) -> Obj:
    """A render object of the parsed one's attributes, its box centred where the parsed one was."""
    w, h = spec.DIGIT_BOX if o.shape == "digit" else (spec.SIZES[o.size],) * 2
    x = int(np.clip(round(o.center[0] - w / 2), spec.MARGIN, spec.BASE_RES - spec.MARGIN - w))
    y = int(np.clip(round(o.center[1] - h / 2), spec.MARGIN, spec.BASE_RES - spec.MARGIN - h))
    return Obj(o.shape, o.color, o.size, o.digit, (x, y, x + w, y + h))


def _moved(fixed: Obj, mover: Obj, rel: str) -> tuple[float, Obj] | None:
    """`mover` at the free spot nearest its own where 'fixed rel mover' holds, and the distance moved."""
    w, h = mover.box_size
    xs, ys = _free_positions(w, h, [fixed])
    keep = _relation_ok(rel, fixed, xs, ys, w, h)
    xs, ys = xs[keep], ys[keep]
    if not len(xs):
        return None
    d = np.hypot(xs - mover.bbox[0], ys - mover.bbox[1])
    j = int(np.argmin(d))
    x, y = int(xs[j]), int(ys[j])
    return float(d[j]), Obj(mover.shape, mover.color, mover.size, mover.digit, (x, y, x + w, y + h))


def repair_relation(scene: ParsedScene, prompt: PromptSpec) -> Image.Image | None:
    """A render of `scene` (at its resolution) with `prompt`'s relation made to hold by the smallest
    move of one object, or None when there is nothing to repair: no relation, objects that do not
    match the prompt, a background other than the named one, or a repair the checker would fail."""
    if prompt.relation is None or len(prompt.objects) != 2 or len(scene.objects) != 2:
        return None
    if scene.background not in spec.BACKGROUNDS or (prompt.background not in (None, scene.background)):
        return None
    for a, b in permutations(scene.objects):
        if not any(_mismatches(o, w) for o, w in zip((a, b), prompt.objects)):
            break
    else:
        return None
    if any(o.shape not in (*spec.SHAPES, "digit") or (o.shape != "digit" and o.size not in spec.SIZES)
           or o.color not in spec.COLORS for o in (a, b)):
        return None
    first, second = _as_obj(a), _as_obj(b)
    # 'a rel b' by moving b with a fixed, or by moving a with 'b converse a'.
    options = []
    if moved := _moved(first, second, prompt.relation):
        options.append((moved[0], [first, moved[1]]))
    if moved := _moved(second, first, CONVERSE[prompt.relation]):
        options.append((moved[0], [moved[1], second]))
    if not options:  # no room for one to move alone: the two trade places along the relation's axis
        k = 0 if prompt.relation in ("left", "right") else 1
        options.append((0.0, [_as_obj(dataclasses.replace(o, center=tuple(p.center[i] if i == k else o.center[i]
                                                                            for i in (0, 1))))
                              for o, p in ((a, b), (b, a))]))
    image = render(Scene(scene.background, min(options, key=lambda o: o[0])[1], "position"), res=scene.res[0])
    return image if check(parse_image(image), prompt).passed else None
