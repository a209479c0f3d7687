"""Tests for sfumato.pairs: caption folders, manifests, and every problem kind, on tiny images."""

import json
import random

import pytest
from PIL import Image, ImageFile

from sfumato import pairs
from sfumato.errors import SfumatoError, UsageError
from sfumato.pairs import (
    Pair,
    check_source,
    format_report,
    open_image,
    read_pairs,
)


def make_image(path, size=(8, 8), mode="RGB", fmt=None, noise=False):
    """Write a tiny image; noise makes PNG data large enough to truncate mid-stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, color=(200, 30, 90) if mode == "RGB" else 128)
    if noise:
        rng = random.Random(0)
        im.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size[0] * size[1])])
    im.save(path, format=fmt)
    return path


def make_pair(root, rel, caption="a red square", size=(8, 8)):
    image = make_image(root / rel, size=size)
    image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return image


def truncated_png(path):
    make_image(path, noise=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- sources ---------------------------------------------------------------------------------

def test_folder_nested_sorted_with_ids_and_sizes(tmp_path):
    make_pair(tmp_path, "sub/deeper/c.webp", "three")
    make_pair(tmp_path, "b.png", "two words", size=(16, 8))
    make_pair(tmp_path, "sub/a.jpg", "  one  \n")
    (tmp_path / "notes.md").write_text("ignored")
    report = read_pairs(tmp_path)
    assert report.problems == []
    assert [p.id for p in report.pairs] == ["b", "sub/a", "sub/deeper/c"]
    assert [p.caption for p in report.pairs] == ["two words", "one", "three"]
    assert [p.size for p in report.pairs] == [(16, 8), (8, 8), (8, 8)]
    assert report.pairs[1].path == tmp_path / "sub" / "a.jpg"
    assert all(p.record is None for p in report.pairs)


def test_uppercase_extensions_and_hidden_files(tmp_path):
    make_image(tmp_path / "A.JPEG", fmt="JPEG")
    (tmp_path / "A.txt").write_text("upper")
    make_pair(tmp_path, ".cache/x.png")  # hidden folder: not part of the corpus
    report = read_pairs(tmp_path)
    assert [(p.id, p.caption) for p in report.pairs] == [("A", "upper")]
    assert report.problems == []


def test_jsonl_manifest_relative_paths(tmp_path):
    data = tmp_path / "data"
    make_image(data / "imgs" / "x.png")
    make_image(tmp_path / "shared" / "y.jpg")  # outside the manifest's folder: allowed
    lines = [{"image": "imgs/x.png", "caption": "an x", "extra": 1},
             {"image": "../shared/y.jpg", "caption": "a y"}]
    manifest = data / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    report = read_pairs(manifest)
    assert report.problems == []
    assert [p.id for p in report.pairs] == ["imgs/x", "../shared/y"]
    assert report.pairs[0].path == data / "imgs" / "x.png"
    assert report.pairs[0].record == lines[0]
    assert report.source == manifest


def test_csv_manifest(tmp_path):
    make_image(tmp_path / "imgs" / "x.png")
    make_image(tmp_path / "imgs" / "z.webp", fmt="WEBP")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text('image,caption,split\nimgs/x.png,"red, then blue",train\n'
                        "imgs/z.webp,a zed,val\n", encoding="utf-8")
    report = read_pairs(manifest)
    assert report.problems == []
    assert [p.caption for p in report.pairs] == ["red, then blue", "a zed"]
    assert report.pairs[1].record == {"image": "imgs/z.webp", "caption": "a zed", "split": "val"}


def test_shapesworld_folder_uses_manifest_and_file_field(tmp_path):
    make_image(tmp_path / "images" / "000.png")
    make_image(tmp_path / "images" / "001.png")
    rows = [{"file": "images/000.png", "caption": "a red circle", "shapes": [{"kind": "circle"}]},
            {"file": "images/001.png", "caption": "a blue square", "shapes": []}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = read_pairs(tmp_path)
    assert report.problems == []  # no .txt files, yet no "image without caption"
    assert [p.id for p in report.pairs] == ["images/000", "images/001"]
    assert report.pairs[0].record == rows[0]


def test_several_captions_of_one_image_share_it(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text('{"image": "x.png", "caption": "one"}\n'
                                      '{"image": "x.png", "caption": "two"}\n')
    report = read_pairs(tmp_path / "m.jsonl")
    assert [(p.id, p.caption) for p in report.pairs] == [("x", "one"), ("x", "two")]


@pytest.mark.parametrize("name", ["missing", "notes.txt"])
def test_bad_source_is_usage_error(tmp_path, name):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match=name):
        read_pairs(tmp_path / name)


# --- problems --------------------------------------------------------------------------------

def _bomb(root):
    return make_pair(root, "big.png", size=(16, 16))


def _empty(root):
    return make_pair(root, "empty.png", caption=" \n\t").with_suffix(".txt")


def _non_utf8(root):
    txt = make_pair(root, "latin.png").with_suffix(".txt")
    txt.write_bytes(b"\xff\xfe\xfa")
    return txt


def _orphan_caption(root):
    txt = root / "lonely.txt"
    txt.write_text("nothing to see")
    return txt


def _truncated(root):
    image = truncated_png(root / "cut.png")
    image.with_suffix(".txt").write_text("cut")
    return image


def _random_bytes(root):
    image = root / "noise.png"
    image.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(300)))
    image.with_suffix(".txt").write_text("noise")
    return image


@pytest.mark.parametrize("make_bad, kind, words", [
    (lambda root: make_image(root / "nocap.png"), "image without caption", "image without caption"),
    (_orphan_caption, "caption without image", "caption without image"),
    (_truncated, "unreadable image", "truncated"),
    (_random_bytes, "unreadable image", "not a PNG"),
    (_bomb, "image too large", "256 pixels"),
    (_empty, "empty caption", "empty caption"),
    (_non_utf8, "non-UTF-8 caption", "not UTF-8"),
])
def test_each_problem_is_reported_with_its_path(tmp_path, make_bad, kind, words):
    make_pair(tmp_path, "good.png")
    bad_path = make_bad(tmp_path)
    report = read_pairs(tmp_path, max_pixels=100)
    assert [p.id for p in report.pairs] == ["good"]
    assert len(report.problems) == 1
    found = report.problems[0]
    assert (found.path, found.kind) == (bad_path, kind)
    assert words in found.reason
    assert f"{bad_path}: {found.reason}" in format_report(report)


def test_manifest_problems_name_manifest_line_or_image(tmp_path):
    make_image(tmp_path / "ok.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        '{"image": "ok.png", "caption": "fine"}',
        "{not json",
        '{"caption": "no image field"}',
        '{"image": "ok.png"}',
        '{"image": "gone.png", "caption": "missing file"}',
        '{"image": "ok.png", "caption": "   "}',
        '["a", "list"]',
        '{"image": "anim.gif", "caption": "wrong type"}',
    ]))
    report = read_pairs(manifest)
    assert [p.caption for p in report.pairs] == ["fine"]
    got = [(p.path, p.kind, p.reason.split(":")[0]) for p in report.problems]
    assert got == [
        (manifest, "bad manifest line", "line 2"),
        (manifest, "bad manifest line", "line 3"),
        (manifest, "bad manifest line", "line 4"),
        (tmp_path / "gone.png", "missing image", "image file not found"),
        (manifest, "empty caption", "line 6"),
        (manifest, "bad manifest line", "line 7"),
        (tmp_path / "anim.gif", "unsupported image",
         "unsupported image type '.gif' (expected .png, .jpg, .jpeg, .webp)"),
    ]


def test_csv_without_needed_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,text\nx.png,hello\n")
    report = read_pairs(manifest)
    assert report.pairs == []
    assert [(p.path, p.kind) for p in report.problems] == [(manifest, "bad manifest line")]


def test_duplicate_image_stem_is_reported(tmp_path):
    make_pair(tmp_path, "a.jpg")
    make_image(tmp_path / "a.png")
    report = read_pairs(tmp_path)
    assert [p.path.name for p in report.pairs] == ["a.jpg"]
    assert [(p.path.name, p.kind) for p in report.problems] == [("a.png", "duplicate image")]


def test_strict_raises_on_first_problem_naming_path(tmp_path):
    make_pair(tmp_path, "good.png")
    first = _truncated(tmp_path)  # "cut" sorts before "nocap"
    make_image(tmp_path / "nocap.png")
    with pytest.raises(SfumatoError) as info:
        read_pairs(tmp_path, strict=True)
    assert not isinstance(info.value, UsageError)
    message = str(info.value)
    assert message.startswith(f"{first}: unreadable image")
    assert "\n" not in message


def test_verify_images_decides_whether_truncation_is_caught(tmp_path):
    make_pair(tmp_path, "good.png")
    _truncated(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    header_only = read_pairs(tmp_path, verify_images=False)
    assert [p.id for p in header_only.pairs] == ["cut", "good"]
    checked = check_source(tmp_path, verify_images=False)  # check_source always decodes
    assert [p.id for p in checked.pairs] == ["good"]
    assert [p.kind for p in checked.problems] == ["unreadable image"]


def test_non_strict_skips_counts_and_summarises(tmp_path):
    make_pair(tmp_path, "a.png", "one")
    make_pair(tmp_path, "b.png", "one two")
    make_pair(tmp_path, "c/c.png", "one two three four five six", size=(16, 8))
    make_pair(tmp_path, "d.png", "one two three")
    _random_bytes(tmp_path)
    make_image(tmp_path / "nocap.png")
    _orphan_caption(tmp_path)
    report = read_pairs(tmp_path)
    s = report.summary()
    assert (s["count"], s["problems"]) == (4, 3)
    assert s["problem_kinds"] == {"unreadable image": 1, "image without caption": 1,
                                  "caption without image": 1}
    assert s["sizes"] == {"8x8": 3, "16x8": 1}
    assert s["caption_words"] == {"min": 1, "median": 2.5, "mean": 3.0, "max": 6}
    lines = format_report(report)
    assert lines[0] == f"4 pairs in {tmp_path}"
    assert lines[1] == "image sizes: 8x8 (3), 16x8 (1)"
    assert lines[2] == "caption words: min 1, median 2.5, mean 3.0, max 6"
    assert lines[-1] == ("skipped 3 of 7 files: 1 caption without image, "
                         "1 image without caption, 1 unreadable image")


def test_empty_source_summary_and_report(tmp_path):
    report = read_pairs(tmp_path)
    s = report.summary()
    assert s["count"] == 0 and s["caption_words"]["min"] is None
    assert format_report(report) == [f"0 pairs in {tmp_path}", "no problems found"]


def test_progress_bar_gives_same_pairs(tmp_path):
    make_pair(tmp_path, "a.png")
    make_pair(tmp_path, "b.png")
    assert read_pairs(tmp_path, progress=True).pairs == read_pairs(tmp_path).pairs


# --- open_image ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, mode", [
    ("x.jpg", "JPEG", "RGB"), ("x.webp", "WEBP", "RGB"), ("x.png", "PNG", "L"),
])
def test_open_image_returns_loaded_rgb(tmp_path, name, fmt, mode):
    make_image(tmp_path / name, size=(8, 6), mode=mode, fmt=fmt)
    im = open_image(tmp_path / name)
    assert (im.mode, im.size) == ("RGB", (8, 6))
    want = (200, 30, 90) if mode == "RGB" else (128, 128, 128)
    # JPEG and lossy WebP shift colours a little; PNG must be exact.
    tolerance = 0 if fmt == "PNG" else 12
    assert all(abs(a - b) <= tolerance for a, b in zip(im.getpixel((0, 0)), want))


def test_open_image_bomb_names_pixels_and_cap(tmp_path):
    make_image(tmp_path / "big.png", size=(20, 10))
    pattern = r"big\.png: image too large: 20x10 = 200 pixels.*cap of 150"
    with pytest.raises(SfumatoError, match=pattern):
        open_image(tmp_path / "big.png", max_pixels=150)


def test_open_image_keeps_pillow_bomb_guard(tmp_path, monkeypatch):
    make_image(tmp_path / "big.png", size=(20, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow raises above 2x this
    with pytest.raises(SfumatoError, match="image too large"):
        open_image(tmp_path / "big.png")


@pytest.mark.parametrize("make_bad, words", [
    (lambda d: truncated_png(d / "cut.png"), "truncated"),
    (lambda d: d / "absent.png", "not found"),
])
def test_open_image_errors_name_path(tmp_path, make_bad, words):
    path = make_bad(tmp_path)
    with pytest.raises(SfumatoError, match=words) as info:
        open_image(path)
    assert str(info.value).startswith(f"{path}: ")


def test_pair_is_hashable_despite_record(tmp_path):
    pair = Pair(tmp_path / "x.png", "c", "x", (8, 8), {"file": "x.png"})
    assert pair in {pair}  # a dict field would break hashing unless excluded


def test_default_pixel_cap_admits_normal_images(tmp_path):
    assert pairs.DEFAULT_MAX_PIXELS == 4096 * 4096
    make_pair(tmp_path, "wide.png", size=(4096, 1))
    assert [p.size for p in read_pairs(tmp_path).pairs] == [(4096, 1)]


def test_list_images_captions_optional(tmp_path):
    make_image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("\ufeffa red circle\n", encoding="utf-8")
    make_image(tmp_path / "d" / "sub" / "b.png")  # no caption: listed all the same
    (tmp_path / "d" / "orphan.txt").write_text("no image")
    make_image(tmp_path / "one.png")
    (tmp_path / "one.txt").write_bytes(b"\xff\xfe")  # unreadable caption: the image without one
    (tmp_path / "notes.md").write_text("x")
    items, problems = pairs.list_images([tmp_path / "d", tmp_path / "one.png", tmp_path / "notes.md"])
    assert [(it.path.name, it.caption) for it in items] == [("a.png", "a red circle"), ("b.png", None),
                                                            ("one.png", None)]
    assert [p.kind for p in problems] == ["unsupported"]
    assert list(pairs.iter_batches(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
