"""index / search / classify through the CLI and the library, on a tiny random CLIP model folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfumato.cli import main
from sfumato.embedding import Embedder
from sfumato.index import open_index
from sfumato.errors import UsageError
from sfumato.search import (COMPOSITE_DEFAULT, TEMPLATES, Query, classify, compose, fill_template, image_query,
                            image_text_query, label_embeddings, near_duplicates)
from searchkit import make_images, make_tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model = make_tiny_model(root / "model")
    other = make_tiny_model(root / "other", seed=1)
    images = make_images(root / "images", n=12)
    assert main(["index", "build", str(images), "--out", str(root / "built"), "--model", str(model)]) == 0
    return {"root": root, "model": model, "other": other, "images": images, "built": root / "built",
            "embedder": Embedder.load(model)}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps stderr at 80 columns when it is not a terminal; keep long paths on one line."""
    monkeypatch.setenv("COLUMNS", "2000")


@pytest.fixture
def ix(kit, tmp_path):
    dst = tmp_path / "ix"
    shutil.copytree(kit["built"], dst)
    return dst


def err_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot_files(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"} if path.exists() else {}


# ---------------------------------------------------------------- index build / add / remove


def test_build_add_remove_and_duplicates(kit, ix, tmp_path, capsys):
    snap = open_index(ix)
    assert len(snap) == 12 and snap.manifest["kind"] == "flat"
    assert snap.model["fingerprint"] == kit["embedder"].fingerprint
    row = snap.rows([0])[0]
    assert row["caption"] and row["width"] == 32 and len(row["sha256"]) == 64 and row["added"]
    capsys.readouterr()
    # re-adding the same folder skips every image (same sha256)
    assert main(["index", "add", str(ix), str(kit["images"])]) == 0
    assert "12 image(s) already in the index" in capsys.readouterr().err
    # a new image without a caption, and a copy of an indexed one under another name
    new = tmp_path / "new"
    make_images(new, n=14, seed=5)
    extra = sorted(new.glob("*.png"))[-1]
    (new / "copy.png").write_bytes(next(kit["images"].glob("*.png")).read_bytes())
    assert main(["index", "add", str(ix), str(extra), str(new / "copy.png")]) == 0
    out = capsys.readouterr()
    assert "added 1;" in out.out and "13 images" in out.out and "1 image(s) already" in out.err
    snap = open_index(ix)
    assert len(snap) == 13 and snap.manifest["version"] == 2
    added = snap.rows([12])[12]
    assert added["path"] == str(extra.resolve()) and added["caption"]  # caption from the .txt beside it
    # remove by path, and a file that is not in the index
    assert main(["index", "remove", str(ix), str(extra), str(tmp_path / "nope.png")]) == 0
    out = capsys.readouterr()
    assert "removed 1;" in out.out and "not in the index" in out.err
    assert len(open_index(ix)) == 12


def test_build_folder_without_captions_and_bad_images(kit, tmp_path, capsys):
    src = tmp_path / "plain"
    src.mkdir()
    for i, p in enumerate(sorted(kit["images"].glob("*.png"))[:4]):
        shutil.copy(p, src / f"img{i}.png")  # no .txt captions
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "cut.png").write_bytes((src / "img0.png").read_bytes()[:60])
    assert main(["index", "build", str(src), "--out", str(tmp_path / "ix"), "--model", str(kit["model"]),
                 "--kind", "hnsw"]) == 0
    out = capsys.readouterr()
    assert "added 4;" in out.out and "hnsw" in out.out
    assert "skipped" in out.err and "broken.png" in out.err and "cut.png" in out.err
    snap = open_index(tmp_path / "ix")
    assert len(snap) == 4 and {r["caption"] for r in snap.rows(range(4)).values()} == {None}


def test_build_with_no_usable_image_writes_nothing(kit, tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.png").write_bytes(b"nope")
    assert main(["index", "build", str(src), "--out", str(tmp_path / "ix"), "--model", str(kit["model"])]) == 2
    assert "no usable images" in err_line(capsys)
    assert not (tmp_path / "ix").exists()


def test_build_refuses_existing_index_without_overwrite(kit, ix, capsys):
    before = snapshot_files(ix)
    assert main(["index", "build", str(kit["images"]), "--out", str(ix), "--model", str(kit["model"])]) == 2
    assert "--overwrite" in err_line(capsys)
    assert snapshot_files(ix) == before
    assert main(["index", "build", str(kit["images"]), "--out", str(ix), "--model", str(kit["model"]),
                 "--overwrite", "--kind", "ivfpq"]) == 0
    assert open_index(ix).manifest["kind"] == "ivfpq" and open_index(ix).manifest["version"] == 2


def test_refuses_another_models_embeddings(kit, ix, tmp_path, capsys):
    before = snapshot_files(ix)
    img = next(kit["images"].glob("*.png"))
    new = tmp_path / "n.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(new)
    assert main(["index", "add", str(ix), str(new), "--model", str(kit["other"])]) == 2
    assert "another model" in err_line(capsys)
    assert main(["search", str(ix), "--image", str(img), "--model", str(kit["other"])]) == 2
    assert "another model" in err_line(capsys)
    assert snapshot_files(ix) == before


def test_concurrent_writer_gets_lock_error(kit, ix, tmp_path, capsys):
    code = (f"import sys, time; sys.path.insert(0, {SRC!r})\n"
            f"from sfumato.index import IndexWriter\n"
            f"with IndexWriter({str(ix)!r}):\n    print('locked', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert main(["index", "remove", str(ix), next(str(q) for q in kit["images"].glob("*.png"))]) == 1
        assert "locked by another writer" in err_line(capsys)
        assert main(["search", str(ix), "--text", "a red circle", "-k", "2"]) == 0  # reading still works
    finally:
        p.kill()
        p.wait()
    assert len(open_index(ix)) == 12


# ---------------------------------------------------------------- search


def test_search_json_and_grid(kit, ix, tmp_path, capsys):
    img = sorted(kit["images"].glob("*.png"))[3]
    grid = tmp_path / "hits.png"
    assert main(["search", str(ix), "--image", str(img), "-k", "4", "--json", "--grid", str(grid)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert isinstance(hits, list) and len(hits) == 4
    assert all({"path", "caption", "score"} <= set(h) for h in hits)
    assert hits[0]["path"] == str(img.resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    with Image.open(grid) as g:
        assert g.format == "PNG" and g.width > 128
    assert main(["search", str(ix), "--text", "a red circle", "-k", "50", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 12  # k beyond the index: every image once


def test_search_by_embedding_file(kit, ix, tmp_path, capsys):
    img = sorted(kit["images"].glob("*.png"))[5]
    vec = image_query(kit["embedder"], img)
    np.save(tmp_path / "q.npy", vec)
    from safetensors.numpy import save_file

    save_file({"embedding": vec[None]}, str(tmp_path / "q.safetensors"))
    for f in ("q.npy", "q.safetensors"):
        assert main(["search", str(ix), "--embedding", str(tmp_path / f), "-k", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["path"] == str(img.resolve())
    np.save(tmp_path / "short.npy", vec[:5])
    assert main(["search", str(ix), "--embedding", str(tmp_path / "short.npy")]) == 2
    assert "shape (5,)" in err_line(capsys)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["search", str(ix), "--embedding", str(tmp_path / "obj.npy")]) == 1
    assert "cannot read the embedding" in err_line(capsys)


def test_bad_inputs_one_line_each(kit, ix, tmp_path, capsys):
    img = str(next(kit["images"].glob("*.png")))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(bomb)  # 64 M pixels: over the cap, refused from the header
    cases = [
        (["search", str(ix), "--text", "  "], 2, "empty"),
        (["search", str(ix), "--text", "a red circle", "-k", "0"], 2, "-k must be"),
        (["search", str(ix), "--text", "x", "-k", "-3"], 2, "-k must be"),
        (["search", str(ix)], 2, "give --text"),
        (["search", str(ix), "--embedding", "e.npy", "--text", "x"], 2, "cannot be combined"),
        (["search", str(ix), "--text", "x", "--alpha", "2"], 2, "--alpha"),
        (["search", str(ix), "--image", str(bomb)], 1, "image too large"),
        (["search", str(ix), "--image", str(tmp_path / "none.png")], 1, "not found"),
        (["search", str(tmp_path / "missing"), "--text", "x"], 2, "no such index"),
        (["search", str(ix), "--image", img, "--text", "blue", "--method", "mix"], 2, "unknown composite"),
        (["search", str(ix), "--text", "x", "--grid", str(tmp_path / "g.jpg")], 2, ".png"),
        (["index", "build", str(tmp_path / "nosrc"), "--out", str(tmp_path / "o"), "--model", str(kit["model"])],
         2, "no such file"),
        (["index", "build", str(kit["images"]), "--out", str(tmp_path / "o"), "--model", str(tmp_path)], 2,
         "no CLIP model"),
        (["index", "add", str(tmp_path / "missing"), img], 2, "no such index"),
    ]
    before = snapshot_files(ix)
    for argv, code, text in cases:
        assert main(argv) == code, argv
        assert text in err_line(capsys), argv
    assert snapshot_files(ix) == before and not (tmp_path / "o").exists() and not (tmp_path / "g.jpg").exists()


def test_corrupted_index_one_line(kit, ix, capsys):
    m = json.loads((ix / "manifest.json").read_text())
    f = ix / m["files"]["vectors"]["name"]
    b = bytearray(f.read_bytes())
    b[-7] ^= 0xFF
    f.write_bytes(bytes(b))
    assert main(["search", str(ix), "--text", "a red circle"]) == 1
    assert "corrupted" in err_line(capsys)
    assert main(["index", "add", str(ix), str(kit["images"])]) == 1
    assert "corrupted" in err_line(capsys)
    assert main(["index", "info", str(ix)]) == 1
    err_line(capsys)
    # the way out the message names: rebuild in place
    assert main(["index", "build", str(kit["images"]), "--out", str(ix), "--model", str(kit["model"]),
                 "--overwrite"]) == 0
    assert len(open_index(ix)) == 12 and open_index(ix).manifest["version"] == 2


def test_composite_query(kit, ix, capsys):
    emb = kit["embedder"]
    img = sorted(kit["images"].glob("*.png"))[2]
    v = image_query(emb, img)
    words, empty = emb.embed_texts(["blue", ""])
    got = image_text_query(emb, img, "blue")
    assert COMPOSITE_DEFAULT["method"] == "delta"
    assert np.allclose(got, v + COMPOSITE_DEFAULT["alpha"] * (words - empty), atol=1e-5)
    assert np.allclose(image_text_query(emb, img, "blue", alpha=0.5, method="sum"), v + 0.5 * words, atol=1e-5)
    assert np.allclose(compose(v, words, empty, 0.0, "delta"), v)
    assert main(["search", str(ix), "--image", str(img), "--text", "in blue", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["search", str(ix), "--image", str(img), "--text", "blue", "--alpha", "0", "-k", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(img.resolve())  # alpha 0: the image itself


def test_near_duplicates_grouped_as_clip_retrieval_groups_them():
    """Linked by cosine similarity above 0.94, transitively; the best-ranked of each group stays."""
    t = np.deg2rad([0, 19, 38, 90, 90.5])  # 0~19 (0.946) and 19~38, though 0 and 38 (0.79) are not: one group
    v = np.stack([np.cos(t), np.sin(t)], 1) * [[1], [2], [1], [3], [1]]  # lengths do not matter
    assert near_duplicates(v) == [1, 2, 4]
    assert near_duplicates(v, threshold=0.99) == [4]
    assert near_duplicates(np.zeros((0, 2))) == []


@pytest.mark.parametrize("fields, cli, api", [
    ({}, "give --text, --image", "give text, image"),
    ({"embedding": [1.0], "text": "x"}, "--embedding cannot be combined", "embedding cannot be combined"),
    ({"embedding": [1.0], "image": "q.png"}, "--embedding cannot be combined", "embedding cannot be combined"),
    ({"text": "  "}, "--text is empty; say what to look for", "text is empty; say what to look for"),
    ({"text": " ", "image": "q.png"}, "--text is empty; say what to change", "text is empty; say what to change"),
    ({"text": "x", "alpha": 2.0}, "--alpha and --method apply to --image with --text", "alpha and method apply"),
    ({"image": "q.png", "method": "sum"}, "--alpha and --method apply", "alpha and method apply"),
    ({"image": "q.png", "text": "x", "method": "mix"}, "unknown composite method 'mix'", "unknown composite"),
])
def test_query_rules(fields, cli, api):
    for flag, needle in (("--", cli), ("", api)):
        with pytest.raises(UsageError, match=needle):
            Query(**fields).validate(flag)


def test_query_vectors(kit, tmp_path):
    emb = kit["embedder"]
    img = sorted(kit["images"].glob("*.png"))[2]
    assert np.array_equal(Query(text="a red circle").validate().vector(emb), emb.embed_texts(["a red circle"])[0])
    assert np.array_equal(Query(image=img).validate().vector(emb), image_query(emb, img))
    assert np.array_equal(Query(image=img, text="blue", alpha=0.5, method="sum").validate().vector(emb),
                          image_text_query(emb, img, "blue", 0.5, "sum"))
    vec = emb.embed_texts(["x"])[0]
    np.save(tmp_path / "q.npy", vec)
    assert np.array_equal(Query(embedding=tmp_path / "q.npy").vector(None, emb.dim), vec)
    assert np.array_equal(Query(embedding=vec.tolist()).vector(None), vec)
    assert Query(text="x").vector(emb, embed_text=lambda t: t.upper()) == "X"  # e.g. the server's text batcher


# ---------------------------------------------------------------- zero-shot


def test_classify_json_probabilities(kit, capsys):
    imgs = [str(p) for p in sorted(kit["images"].glob("*.png"))[:3]]
    assert main(["classify", *imgs, "--labels", "red circle, blue square,green cross", "--model",
                 str(kit["model"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in res] == imgs
    for r in res:
        assert list(r["probabilities"]) == ["red circle", "blue square", "green cross"]
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    # one template gives other probabilities than the ensemble
    assert main(["classify", imgs[0], "--labels", "red circle,blue square,green cross", "--model",
                 str(kit["model"]), "--json", "--template", "an image of a {}"]) == 0
    one = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert one != res[0]["probabilities"]


def test_classify_uses_template_ensemble(kit, monkeypatch):
    emb = kit["embedder"]
    assert "{}" in TEMPLATES and "a {}" in TEMPLATES and len(TEMPLATES) >= 4
    seen = []
    real = Embedder.embed_texts
    monkeypatch.setattr(Embedder, "embed_texts", lambda self, texts: seen.extend(texts) or real(self, texts))
    img = Image.open(next(kit["images"].glob("*.png")))
    probs = classify(emb, [img, img], ["red circle", "a blue square"])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1)
    assert len(seen) == 2 * len(TEMPLATES)
    assert {"red circle", "a red circle", "an image of a red circle", "a blue square"} <= set(seen)
    assert "a a blue square" not in seen
    lab = label_embeddings(emb, ["red circle"], ("{}",))
    assert np.allclose(lab[0], real(emb, ["red circle"])[0], atol=1e-5)


def test_fill_template_and_label_errors(kit, tmp_path, capsys):
    assert fill_template("a {}", "red circle") == "a red circle"
    assert fill_template("an image of a {}", "the digit 7") == "an image of the digit 7"
    img = str(next(kit["images"].glob("*.png")))
    m = ["--model", str(kit["model"])]
    assert main(["classify", img, "--labels", "one", *m]) == 2
    assert "at least two labels" in err_line(capsys)
    assert main(["classify", img, "--labels", "a,,b", *m]) == 2
    err_line(capsys)
    assert main(["classify", img, *m]) == 2
    err_line(capsys)
    (tmp_path / "labels.txt").write_text("red circle\nblue square\n\n")
    assert main(["classify", img, "--labels-file", str(tmp_path / "labels.txt"), *m, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["probabilities"]) == 2
    assert main(["classify", img, "--labels", "a,b", "--template", "no slot", *m]) == 2
    err_line(capsys)
