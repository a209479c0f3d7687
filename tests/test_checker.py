"""Tests for the ShapesWorld scene checker: clean renders pass, damaged ones mostly pass, and
every scene edited to contradict its caption fails."""

import copy
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sfumato.shapesworld import ShapesWorld, spec
from sfumato.shapesworld.checker import ObjSpec, _label, check, judge, parse_image, parse_prompt
from sfumato.shapesworld.render import Obj, Scene, _free_positions, make_scene, render


def _damage(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild damage: Gaussian blur (radius 0.7) then Gaussian noise (sigma 8), clipped to 0..255."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=0.7)), np.float32)
    a = a + rng.normal(0.0, 8.0, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _flood_fill(mask: np.ndarray) -> set[frozenset]:
    """8-connected components as sets of pixels, by a plain flood fill (the oracle)."""
    seen, comps = set(), set()
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        stack, comp = [start], set()
        seen.add(start)
        while stack:
            y, x = stack.pop()
            comp.add((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if (0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q]
                            and q not in seen):
                        seen.add(q)
                        stack.append(q)
        comps.add(frozenset(comp))
    return comps


def test_label_matches_flood_fill():
    rng = np.random.default_rng(1)
    for density in (0.1, 0.3, 0.45, 0.6):
        for _ in range(20):
            mask = rng.random((23, 31)) < density
            labels, n = _label(mask)
            got = {frozenset(map(tuple, np.argwhere(labels == k))) for k in range(1, n + 1)}
            assert got == _flood_fill(mask) and ((labels > 0) == mask).all()


# ---------------------------------------------------------------- clean and damaged renders


@pytest.mark.parametrize("n, seed, res", [(1200, 11, 64), (800, 12, 128)])
def test_clean_renders_pass_and_parse_exactly(n, seed, res):
    data = ShapesWorld(n, seed=seed, res=res)
    failures, wrong_parse = [], []
    for i in range(n):
        image, caption, record = data[i]
        v = judge(image, caption)
        if not v.passed:
            failures.append(f"{i}: {caption!r}: {v.reason}")
        # The parse itself must match the record: same objects, same boxes.
        got = sorted((o.shape, o.color, o.size, o.digit, o.bbox) for o in v.scene.objects)
        want = sorted((o["shape"], o["color"], o["size"], o["digit"], tuple(o["bbox"])) for o in record["objects"])
        close = len(got) == len(want) and all(
            g[:4] == w[:4] and np.allclose(g[4], w[4], atol=0.5) for g, w in zip(got, want))
        if not close or v.scene.background != record["background"]:
            wrong_parse.append(f"{i}: {record['objects']} parsed as {v.scene.to_dict()['objects']}")
    assert not failures, f"{len(failures)}/{n} clean renders failed at {res} px:\n" + "\n".join(failures[:5])
    assert not wrong_parse, f"{len(wrong_parse)}/{n} parses differ from the record:\n" + "\n".join(wrong_parse[:3])


def test_damaged_renders_mostly_pass():
    data = ShapesWorld(400, seed=13, res=64)
    rng = np.random.default_rng(0)
    failures = []
    for i in range(len(data)):
        image, caption, _ = data[i]
        v = judge(_damage(image, rng), caption)
        if not v.passed:
            failures.append(f"{i}: {caption!r}: {v.reason}")
    rate = 1 - len(failures) / len(data)
    assert rate >= 0.95, f"only {rate:.1%} of damaged renders pass:\n" + "\n".join(failures[:5])


# ---------------------------------------------------------------- wrong scenes


def _named_color(scene: Scene, o: Obj) -> bool:
    """Does the caption name this object's colour?"""
    if scene.category == "counting":
        return True
    if o.shape == "digit":
        return o.color in scene.caption
    return re.search(rf"\b{o.color} {o.shape}\b", scene.caption) is not None


def _named_size(scene: Scene, o: Obj) -> bool:
    """Does the caption name this object's size?"""
    words = "|".join(spec.SIZE_WORDS[o.size])
    noun = spec.PLURALS[o.shape] if scene.category == "counting" else o.shape
    return re.search(rf"\b(?:{words}) (?:\w+ )?{noun}\b", scene.caption) is not None


def _fits(o: Obj, others: list[Obj]) -> bool:
    """Is o's box inside the canvas margins and clear of the others?"""
    xs, ys = _free_positions(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1], others)
    return bool(np.any((xs == o.bbox[0]) & (ys == o.bbox[1])))


def _edit(kind: str, scene: Scene, rng: random.Random) -> Scene | None:
    """A copy of scene changed so that it contradicts its caption, or None when `kind` cannot."""
    s = copy.deepcopy(scene)
    objs = s.objects
    if kind == "missing":
        objs.pop(rng.randrange(len(objs)))
    elif kind == "extra":
        o = Obj(rng.choice(spec.SHAPES), rng.choice(tuple(spec.COLORS)), rng.choice(("small", "large")))
        w, h = o.box_size
        xs, ys = _free_positions(w, h, objs)
        if len(xs) == 0:
            return None
        j = rng.randrange(len(xs))
        o.bbox = (int(xs[j]), int(ys[j]), int(xs[j]) + w, int(ys[j]) + h)
        objs.append(o)
    elif kind == "swap_colors":
        if len(objs) != 2 or objs[0].color == objs[1].color or not all(_named_color(s, o) for o in objs):
            return None
        objs[0].color, objs[1].color = objs[1].color, objs[0].color
    elif kind == "mirror":
        rel = s.meta.get("relation")
        if rel is None:
            return None
        for o in objs:  # reflect across the canvas centre along the relation's axis
            x0, y0, x1, y1 = o.bbox
            o.bbox = (64 - x1, y0, 64 - x0, y1) if rel in ("left", "right") else (x0, 64 - y1, x1, 64 - y0)
    elif kind == "digit":
        if objs[0].shape != "digit":
            return None
        objs[0].digit = (objs[0].digit + rng.randrange(1, 10)) % 10
    elif kind == "color":
        named = [o for o in objs if _named_color(s, o)]
        if not named:
            return None
        o = rng.choice(named)
        o.color = rng.choice([c for c in spec.COLORS if c != o.color])
    elif kind == "shape":
        shapes = [o for o in objs if o.shape != "digit"]
        if not shapes:
            return None
        o = rng.choice(shapes)
        o.shape = rng.choice([x for x in spec.SHAPES if x != o.shape])
    elif kind == "size":
        named = [o for o in objs if o.shape != "digit" and _named_size(s, o)]
        if not named:
            return None
        o = rng.choice(named)
        o.size = "large" if o.size == "small" else "small"
        d = spec.SIZES[o.size]
        cx, cy = (int(c) for c in o.center)
        o.bbox = (cx - d // 2, cy - d // 2, cx - d // 2 + d, cy - d // 2 + d)
        if not _fits(o, [p for p in objs if p is not o]):
            return None
    else:
        raise ValueError(kind)
    return s


EDIT_CATEGORIES = {
    "missing": spec.CATEGORIES,
    "extra": spec.CATEGORIES,
    "swap_colors": ("attribute_binding",),
    "mirror": ("position",),
    "digit": ("text",),
    "color": spec.CATEGORIES,
    "shape": tuple(c for c in spec.CATEGORIES if c != "text"),
    "size": ("size", "counting", "two_objects", "position", "attribute_binding", "single_object"),
}


@pytest.mark.parametrize("kind", list(EDIT_CATEGORIES))
def test_wrong_scenes_all_fail(kind):
    rng = random.Random(f"wrong-{kind}")
    tried, passed = 0, []
    for i in range(2000):
        scene = make_scene(21, i, EDIT_CATEGORIES[kind])
        wrong = _edit(kind, scene, rng)
        if wrong is None:
            continue
        tried += 1
        v = judge(render(wrong, 64), scene.caption)
        if v.passed:
            passed.append(f"{scene.caption!r} vs {[o.to_record() for o in wrong.objects]}: {v.reason}")
        if tried == 60:
            break
    assert tried >= 50, f"only {tried} {kind!r} edits could be made"
    assert not passed, f"{len(passed)}/{tried} {kind!r} scenes passed:\n" + "\n".join(passed[:5])


def _scene(bg: str, *objs: tuple) -> Scene:
    return Scene(bg, [Obj(shape, color, size, digit, bbox) for shape, color, size, digit, bbox in objs], "custom")


def test_misdrawn_shapes_are_not_passed_off_as_valid():
    # Between the two sizes or beyond them: the shape is named but its size is "unknown".
    off_size = {
        "a red circle": _scene("black", ("circle", "red", "small", None, (20, 20, 35, 35))),
        "a small red circle": _scene("white", ("circle", "red", "small", None, (20, 20, 37, 37))),
        "a large green triangle": _scene("gray", ("triangle", "green", "large", None, (10, 10, 27, 27))),
        "a green triangle": _scene("gray", ("triangle", "green", "large", None, (10, 10, 40, 40))),
        "a yellow cross": _scene("black", ("cross", "yellow", "small", None, (20, 20, 28, 28))),
    }
    for caption, scene in off_size.items():
        v = judge(render(scene, 64), caption)
        assert not v.passed and "neither small" in v.reason, (caption, v.reason)
        assert [(o.shape, o.size) for o in v.scene.objects] == [(scene.objects[0].shape, "unknown")]
    # Stretched or squeezed: no template fits, so the shape is "unknown".
    garbage = {
        "a blue square": _scene("white", ("square", "blue", "small", None, (20, 20, 32, 42))),
        "a square": _scene("white", ("square", "blue", "small", None, (20, 20, 32, 35))),
        "the digit 8": _scene("black", ("digit", "red", None, 8, (20, 20, 32, 45))),
        "a red digit 3": _scene("black", ("digit", "red", None, 3, (20, 20, 35, 38))),
    }
    for caption, scene in garbage.items():
        v = judge(render(scene, 64), caption)
        assert not v.passed and "unrecognised" in v.reason, (caption, v.reason)
        assert [o.shape for o in v.scene.objects] == ["unknown"], v.scene.to_dict()
    # Hand-drawn blobs that are no ShapesWorld shape: a ring, an L, a thick bar.
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(xx - 31.5, yy - 31.5)
    for caption, blob in {"a red circle": (r < 11) & (r > 6), "a large red square": (xx >= 20) & (xx < 42) & (yy >= 20)
                          & (yy < 42) & ~((xx >= 28) & (yy < 34)), "a red cross": (xx >= 20) & (xx < 44) & (yy >= 28)
                          & (yy < 36)}.items():
        a = np.zeros((64, 64, 3), np.uint8)
        a[blob] = spec.COLORS["red"]
        v = judge(a, caption)
        assert not v.passed and [o.shape for o in v.scene.objects] == ["unknown"], (caption, v.reason)
    two_tone = _scene("black", ("square", "red", "small", None, (20, 20, 32, 32)),
                      ("square", "blue", "small", None, (26, 20, 38, 32)))
    v = judge(render(two_tone, 64), "a large square")
    assert not v.passed and "unrecognised" in v.reason, v.reason


# ---------------------------------------------------------------- prompts


def test_parse_prompt_every_form_and_synonym():
    for word, size in spec.WORD_SIZE.items():
        for color in spec.COLORS:
            for shape in spec.SHAPES:
                p = parse_prompt(f"a {word} {color} {shape}")
                assert p.objects == (ObjSpec(shape, color, size),) and p.relation is None
    assert parse_prompt("a cross").objects == (ObjSpec("cross"),)
    assert parse_prompt("a tiny circle").objects == (ObjSpec("circle", None, "small"),)
    p = parse_prompt("a big orange square on a gray background")
    assert p.objects == (ObjSpec("square", "orange", "large"),) and p.background == "gray"
    for bg in spec.BACKGROUNDS:
        assert parse_prompt(f"a circle on a {bg} background").background == bg
    for phrase, rel in spec.WORD_RELATION.items():
        p = parse_prompt(f"a little red circle {phrase} a blue square")
        assert p.relation == rel and p.relation_phrase == phrase
        assert p.objects == (ObjSpec("circle", "red", "small"), ObjSpec("square", "blue"))
    p = parse_prompt("a triangle and a large purple cross on a white background")
    assert p.objects == (ObjSpec("triangle"), ObjSpec("cross", "purple", "large")) and p.relation is None
    assert p.background == "white"
    for word, n in spec.NUMBERS.items():
        for plural, shape in spec.SINGULARS.items():
            assert parse_prompt(f"{word} green {plural}").objects == (ObjSpec(shape, "green"),) * n
    assert parse_prompt("three big red crosses").objects == (ObjSpec("cross", "red", "large"),) * 3
    for d in range(10):
        assert parse_prompt(f"the digit {d}").objects == (ObjSpec("digit", None, None, d),)
        assert parse_prompt(f"the digit {d} in blue").objects == (ObjSpec("digit", "blue", None, d),)
        assert parse_prompt(f"a yellow digit {d} on a black background").objects == (ObjSpec("digit", "yellow", None, d),)
    json.dumps(parse_prompt("a red circle above a square").to_dict())


def test_parse_prompt_matches_generated_records():
    for i in range(450):
        s = make_scene(5, i)
        p = parse_prompt(s.caption)
        assert p.relation == s.meta["relation"], s.caption
        assert sorted(o.shape for o in p.objects) == sorted(o.shape for o in s.objects), s.caption
        for want, o in zip(p.objects, s.objects):
            assert want.color in (None, o.color) and want.size in (None, o.size) and want.digit in (None, o.digit)
        assert p.background in (None, s.background)


@pytest.mark.parametrize("text", [
    "", "a dog", "a red circle.", "two circles", "one red circle", "three red circle", "a red circles",
    "a red circle left of", "a red circle and", "the digit 12", "a digit 3", "a red circle on a red background",
    "a circle beside a square", "a huge circle", "red circle", "a red circle on a black background and a square",
])
def test_parse_prompt_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="ShapesWorld caption|empty caption"):
        parse_prompt(text)


# ---------------------------------------------------------------- reasons and garbage


def test_reasons_name_counts_and_attributes():
    full = _scene("black", ("circle", "red", "small", None, (6, 20, 18, 32)),
                  ("square", "blue", "large", None, (36, 16, 58, 38)))
    caption = "a red circle to the left of a blue square"
    assert judge(render(full, 64), caption).passed
    assert check(parse_image(render(full, 64)), parse_prompt(caption)).passed
    missing = copy.deepcopy(full)
    missing.objects.pop()
    v = judge(render(missing, 64), caption)
    assert not v.passed and "expected 2 objects" in v.reason and "found 1" in v.reason, v.reason
    assert "1 red circle" in v.reason, v.reason
    v = judge(render(full, 64), "a red circle to the right of a blue square")
    assert not v.passed and "'to the right of'" in v.reason and "left of" in v.reason, v.reason
    v = judge(render(full, 64), "a red circle left of a blue square on a white background")
    assert not v.passed and v.reason == "expected background white, found black", v.reason
    three = _scene("white", *[("square", "red", "small", None, (4 + 16 * k, 10, 16 + 16 * k, 22)) for k in range(2)],
                   ("circle", "red", "small", None, (40, 40, 52, 52)))
    v = judge(render(three, 64), "three red squares")
    assert not v.passed and v.reason == "expected 3 red squares, found 2 red squares and 1 red circle", v.reason
    json.dumps(v.to_dict())


@pytest.mark.parametrize("res", [64, 128])
def test_noise_and_blank_images_fail(res):
    rng = np.random.default_rng(res)
    noise = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    assert not judge(noise, "a red circle").passed
    assert not judge(Image.fromarray(noise), "a red circle on a gray background").passed
    for bg, rgb in spec.BACKGROUNDS.items():
        blank = Image.new("RGB", (res, res), rgb)
        v = judge(blank, "a red circle")
        assert not v.passed and "found 0" in v.reason, v.reason
        assert parse_image(blank).background == bg
    # Sparse salt noise on a clean background: specks, not objects.
    salt = np.zeros((res, res, 3), np.uint8)
    ys, xs = rng.integers(0, res, (2, 40))
    salt[ys, xs] = spec.COLORS["red"]
    assert not judge(salt, "a red circle").passed


def test_the_shipped_vaes_digits_are_read_as_their_digit_and_never_as_another():
    """The shipped VAE redraws the blocky glyphs with rounded, thinner strokes (a diagonal may
    break); the digit reader is calibrated to read them (benchmarks/checker_calibration.py)."""
    import torch
    from diffusers import AutoencoderKL

    from sfumato.pipeline import DEFAULT_MODEL

    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL / "vae").eval()
    scenes = [make_scene(4242, i, ("text",)) for i in range(60)]
    x = torch.stack([torch.from_numpy(np.asarray(render(s, 64).convert("RGB"))).permute(2, 0, 1) for s in scenes])
    with torch.no_grad():
        y = vae.decode(vae.encode(x.float() / 127.5 - 1).latent_dist.mode()).sample
    recon = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    read = [judge(r, s.caption).passed for r, s in zip(recon, scenes)]
    assert np.mean(read) >= 0.85, np.mean(read)
    for r, s in zip(recon, scenes):
        k = s.objects[0].digit
        other = s.caption.replace(f"digit {k}", f"digit {(k + 3) % 10}")
        assert not judge(r, other).passed, other
