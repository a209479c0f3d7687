"""ShapesWorld generator: contract numbers, determinism, atomic folders."""

import json

import numpy as np
import pytest

from sfumato.errors import UsageError
from sfumato.shapesworld import ShapesWorld, make_scene, render, spec, write_dataset
from sfumato.shapesworld.render import Obj, Scene


def test_palette_and_flat_colour():
    scene = Scene("white", [Obj("square", "blue", "large", bbox=(10, 10, 32, 32))], "colors", "a big blue square")
    a = np.asarray(render(scene))
    assert tuple(a[20, 20]) == spec.COLORS["blue"]
    assert tuple(a[0, 0]) == spec.BACKGROUNDS["white"]
    # The whole box is lit and nothing outside it.
    lit = (a != 255).any(-1)
    ys, xs = np.nonzero(lit)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (10, 10, 32, 32)


def test_digit_glyph_blocks():
    scene = Scene("black", [Obj("digit", "red", None, 7, bbox=(20, 20, 35, 41))], "text", "the digit 7")
    a = np.asarray(render(scene))[..., 0] > 0
    for r, row in enumerate(spec.DIGIT_GLYPHS[7]):
        for c, bit in enumerate(row):
            block = a[20 + 3 * r: 23 + 3 * r, 20 + 3 * c: 23 + 3 * c]
            assert block.all() == (bit == "1") and block.any() == (bit == "1")


def test_triangle_and_cross_geometry():
    tri = np.asarray(render(Scene("black", [Obj("triangle", "red", "large", bbox=(2, 2, 24, 24))], "size")))[..., 0]
    assert tri[2, 2] == 0 and tri[2, 13] > 0 and tri[23, 2] > 0 and tri[23, 23] > 0  # apex top middle, base bottom
    cross = np.asarray(render(Scene("black", [Obj("cross", "red", "small", bbox=(2, 2, 14, 14))], "size")))[..., 0]
    assert cross[2, 2] == 0 and cross[2, 8] > 0 and cross[8, 2] > 0 and cross[13, 13] == 0


def test_placement_rules_hold():
    for i in range(600):
        s = make_scene(3, i)
        assert 1 <= len(s.objects) <= 4
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert spec.MARGIN <= x0 < x1 <= 64 - spec.MARGIN and spec.MARGIN <= y0 < y1 <= 64 - spec.MARGIN
        for a in range(len(s.objects)):
            for b in range(a + 1, len(s.objects)):
                p, q = s.objects[a].bbox, s.objects[b].bbox
                gap_x = max(q[0] - p[2], p[0] - q[2])
                gap_y = max(q[1] - p[3], p[1] - q[3])
                assert max(gap_x, gap_y) >= spec.GAP, (i, s.caption)


def test_relation_margins():
    for i in range(400):
        s = make_scene(5, i, ("position",))
        (ax, ay), (bx, by) = s.objects[0].center, s.objects[1].center
        dx, dy = bx - ax, by - ay
        along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[s.meta["relation"]]
        assert along >= 12 and abs(across) <= along / 2, s.caption


def test_captions_follow_grammar_words():
    words = set()
    for i in range(900):
        c = make_scene(1, i).caption
        assert c == c.lower() and not c.endswith(".")
        words |= set(c.split())
    assert {"tiny", "little", "big", "beneath", "crosses", "four", "digit"} <= words


def test_deterministic_and_sharded():
    a = ShapesWorld(20, seed=4)
    b = ShapesWorld(20, seed=4)
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) and x[1] == y[1] for x, y in zip(a, b))
    assert ShapesWorld(20, seed=5)[0][1] != a[0][1] or ShapesWorld(20, seed=5)[1][1] != a[1][1]
    shard = ShapesWorld(20, seed=4, rank=1, world_size=2)
    assert len(shard) == 10 and shard[0][1] == a[1][1] and shard[9][1] == a[19][1]


def test_any_resolution_scales_geometry():
    img, _, rec = ShapesWorld(3, seed=2, res=128)[0]
    assert img.size == (128, 128) and rec["size"] == 128
    assert all(0 <= v <= 64 for o in rec["objects"] for v in o["bbox"])  # bbox stays in 64-px units


def test_write_dataset_and_refusals(tmp_path):
    out = tmp_path / "ds"
    summary = write_dataset(out, 27, seed=0)
    assert summary["categories"] == {c: 3 for c in sorted(spec.CATEGORIES)}
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 27
    rec = json.loads(lines[4])
    assert (out / rec["file"]).exists()
    assert (out / rec["file"].replace(".png", ".txt")).read_text() == rec["caption"]
    assert json.loads((out / rec["file"].replace(".png", ".json")).read_text())["objects"] == rec["objects"]
    with pytest.raises(UsageError, match="not empty"):
        write_dataset(out, 5)
    write_dataset(out, 5, overwrite=True)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left behind
    with pytest.raises(UsageError, match="category"):
        write_dataset(tmp_path / "x", 5, categories=("nope",))
    assert not (tmp_path / "x").exists()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import sfumato.shapesworld.dataset as ds

    calls = {"n": 0}
    real = ds.render

    def boom(scene, res=64):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(scene, res)

    monkeypatch.setattr(ds, "render", boom)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "ds", 10)
    assert list(tmp_path.iterdir()) == []


def test_training_mix_gives_categories_their_shares():
    order = spec.mix_categories("position=3,text=0")
    assert order.count("position") == 3 and "text" not in order and order.count("colors") == 1
    assert spec.mix_categories("") == spec.CATEGORIES
    ds = ShapesWorld(len(order) * 4, categories=order)
    cats = [ds[i][2]["category"] for i in range(len(ds))]
    assert cats.count("position") == 12 and "text" not in cats
    for bad in ("nope=2", "position", "position=-1", "position=99", "single_object=0,colors=0,size=0,background=0,"
                "two_objects=0,counting=0,position=0,attribute_binding=0,text=0"):
        with pytest.raises(ValueError):
            spec.mix_categories(bad)


def test_training_mix_is_checked_and_changes_the_data():
    from sfumato.config import DataCfg, apply_overrides, get_preset, validate
    from sfumato.data import load_pairs_data

    with pytest.raises(UsageError, match="data.shapes_mix"):
        validate(apply_overrides(get_preset("small"), ["data.shapes_mix=bogus=1"]))
    plain = load_pairs_data("shapesworld", DataCfg(res=32, shapes_n=18), progress=False)
    mixed = load_pairs_data("shapesworld", DataCfg(res=32, shapes_n=18, shapes_mix="counting=9"), progress=False)
    assert plain.fingerprint != mixed.fingerprint
    counts = sum(c.split()[0] in spec.NUMBERS for c in mixed.captions), sum(c.split()[0] in spec.NUMBERS
                                                                               for c in plain.captions)
    assert counts[0] > counts[1]
