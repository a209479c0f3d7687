"""Data laid out the Hugging Face way (imagefolder with metadata.csv / metadata.jsonl), manifests with
other column names, and a data set without one usable pair: `data check`, training and the reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sfumato.cli import main
from sfumato.config import DataCfg
from sfumato.data import load_pairs_data
from sfumato.errors import UsageError
from sfumato.pairs import IMAGE_WITHOUT_CAPTION, PairSource, read_pairs, require_pairs

CAPTIONS = ["a red circle", "two blue squares", "a green cross on a white background", "a yellow triangle"]


def image(path, colour=(200, 30, 90), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def imagefolder(root, kind="csv", n=4, prefix=""):
    """Hugging Face's imagefolder: images plus metadata.<kind> with file_name and text."""
    rows = []
    for i in range(n):
        name = f"{prefix}img{i}.png"
        image(root / name, (40 * i, 100, 200 - 40 * i))
        rows.append({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)], "score": i})
    if kind == "csv":
        lines = ["file_name,text,score"] + [f'{r["file_name"]},"{r["text"]}",{r["score"]}' for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- the reader


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_imagefolder_metadata_is_read_as_pairs(tmp_path, kind):
    root = imagefolder(tmp_path / "hf", kind)
    (root / "notes.txt").write_text("not a caption")  # a caption folder's .txt means nothing here
    report = read_pairs(root)
    assert report.problems == []
    assert [(p.id, p.caption) for p in report.pairs] == [(f"img{i}", CAPTIONS[i]) for i in range(4)]
    assert str(report.pairs[0].record["score"]) == "0"


def test_imagefolder_splits_and_unlisted_images(tmp_path):
    root = tmp_path / "hf"
    imagefolder(root / "train", "jsonl", n=3)
    imagefolder(root / "test", "csv", n=2)
    image(root / "train" / "stray.png")  # no metadata row names it
    rows = (root / "train" / "metadata.jsonl").read_text().splitlines()
    rows[1] = json.dumps({"file_name": "img1.png", "text": "  "})  # named, but its caption is empty
    (root / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    report = read_pairs(root)
    assert [p.id for p in report.pairs] == ["test/img0", "test/img1", "train/img0", "train/img2"]
    assert [(p.path.name, p.kind) for p in report.problems] == [("metadata.jsonl", "empty caption"),
                                                              ("stray.png", IMAGE_WITHOUT_CAPTION)]
    assert "metadata.jsonl" in report.problems[1].reason


def test_both_metadata_files_in_one_folder_is_refused(tmp_path):
    root = imagefolder(tmp_path / "hf", "csv")
    imagefolder(root, "jsonl")
    with pytest.raises(UsageError, match="both metadata.jsonl and metadata.csv"):
        read_pairs(root)


def test_other_column_names(tmp_path):
    for i in range(3):
        image(tmp_path / "pics" / f"{i}.png")
    rows = [{"path": f"pics/{i}.png", "prompt": CAPTIONS[i]} for i in range(3)]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_pairs(manifest).pairs == []
    report = read_pairs(manifest, image_column="path", caption_column="prompt")
    assert [p.caption for p in report.pairs] == CAPTIONS[:3] and report.problems == []
    assert [p.caption for p in read_pairs(PairSource(manifest, "path", "prompt")).pairs] == CAPTIONS[:3]
    csv = tmp_path / "pairs.csv"
    csv.write_text("path,prompt\n" + "".join(f"pics/{i}.png,{CAPTIONS[i]}\n" for i in range(3)))
    assert len(read_pairs(csv, image_column="path", caption_column="prompt").pairs) == 3
    bad = read_pairs(csv)  # the default names are not there: the header problem names them
    assert "'file_name'" in bad.problems[0].reason and "'text'" in bad.problems[0].reason


def test_no_usable_pair_says_what_was_looked_for(tmp_path):
    folder = tmp_path / "classes"
    image(folder / "cat" / "1.png")  # a classification folder: images, no captions
    with pytest.raises(UsageError) as e:
        require_pairs(read_pairs(folder))
    msg = str(e.value)
    assert "no usable image-caption pairs" in msg and "1 problem " in msg
    assert ".txt caption" in msg and "metadata.jsonl" in msg and "metadata.csv" in msg


# ---------------------------------------------------------------- sfumato data check


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_data_check_reads_an_imagefolder(tmp_path, capsys, kind):
    root = imagefolder(tmp_path / "hf", kind)
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"\n4 pairs in {root}\n" in out and "no problems found" in out


def test_data_check_with_no_usable_pair_fails(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty)]) == 2
    line = err_line(capsys)
    assert line.startswith("error: no usable image-caption pairs") and "metadata.csv" in line
    image(empty / "a.png")
    assert main(["data", "check", str(empty), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] == 0 and "looked for" in captured.err


def test_data_check_column_options(tmp_path, capsys):
    image(tmp_path / "x.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,prompt\nx.png,a red circle\n")
    assert main(["data", "check", str(manifest)]) == 2
    assert "'path'" not in err_line(capsys)  # the defaults, not the file's names, were looked for
    assert main(["data", "check", str(manifest), "--image-column", "path", "--caption-column", "prompt"]) == 0
    assert f"\n1 pairs in {manifest}\n" in capsys.readouterr().out
    assert main(["data", "check", str(manifest), "--image-column", "path"]) == 2  # caption column still unknown
    assert "'caption' or 'text'" in err_line(capsys)
    folder = tmp_path / "caps"
    image(folder / "y.png")
    (folder / "y.txt").write_text("a blue square")
    assert main(["data", "check", str(folder), "--caption-column", "prompt"]) == 2
    assert "--caption-column" in err_line(capsys)


# ---------------------------------------------------------------- training


def test_training_reads_an_imagefolder_and_named_columns(tmp_path):
    root = imagefolder(tmp_path / "hf", "jsonl")
    pd = load_pairs_data(str(root), DataCfg(res=16), progress=False)
    assert pd.captions == CAPTIONS and tuple(pd.images.shape) == (4, 3, 16, 16)
    rows = [{"path": f"hf/img{i}.png", "prompt": CAPTIONS[i]} for i in range(4)]
    manifest = tmp_path / "other.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match="'file_name'"):
        load_pairs_data(str(manifest), DataCfg(res=16), progress=False)
    pd = load_pairs_data(PairSource(manifest, "path", "prompt"), DataCfg(res=16), progress=False)
    assert pd.captions == CAPTIONS


def test_train_cli_column_options(tmp_path, capsys):
    imagefolder(tmp_path / "hf", "jsonl")
    rows = [{"path": f"hf/img{i}.png", "prompt": CAPTIONS[i]} for i in range(4)]
    manifest = tmp_path / "other.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model"
    args = ["train", "--preset", "tiny", "--data", str(manifest), "--out", str(out), "--stages", "tokenizer"]
    assert main(args) == 2
    assert "no usable image-caption pairs" in err_line(capsys)
    assert main(args + ["--image-column", "path", "--caption-column", "prompt"]) == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "model.partial" / "run.json").read_text())
    assert state["data"]["pairs"] == 4


def test_cut_captions_warn_in_one_line_when_training(tmp_path):
    """The tokenizer stage's note about captions longer than the context: one `warning:` line, not
    Python's report with a file name and a source line (a subprocess: pytest records warnings)."""
    root = imagefolder(tmp_path / "hf", "csv")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sfumato", "train", "--preset", "tiny", "--data", str(root),
                           "--out", str(tmp_path / "m"), "--stages", "tokenizer", "--set",
                           "tokenizer.context_length=6"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "captions are longer" in l]
    assert len(lines) == 1 and lines[0].startswith("warning: "), proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr and ".py:" not in proc.stderr
