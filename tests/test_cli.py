"""CLI conventions: help, version, one-line errors with the right exit codes."""

import json

from sfumato import __version__
from sfumato.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    assert main(["data", "shapes", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--seed" in text and "default: 1000" in text.replace("[", "").replace("]", "")


def test_usage_error_is_one_line_exit_2(capsys):
    assert main(["data", "shapes", "--n", "3"]) == 2  # --out missing
    err = capsys.readouterr().err.strip()
    assert "--out" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_value_exit_2(tmp_path, capsys):
    assert main(["data", "shapes", "--n", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_missing_source_and_verbose_traceback(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    assert main(["-v", "data", "check", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_shapes_then_check_with_scenes(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--n", "45", "--seed", "1", "--out", str(out)]) == 0
    assert main(["data", "shapes", "--n", "45", "--out", str(out)]) == 2  # refuses a non-empty folder
    capsys.readouterr()
    assert main(["data", "check", str(out), "--scenes", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 45 and summary["problems"] == 0
    assert summary["scenes"]["passed"] == 45, summary["scenes"]["failures"][:3]


def test_check_strict_fails_on_problem(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")  # one usable pair: no pair at all is an error
    (tmp_path / "ok.txt").write_text("a black square")
    (tmp_path / "orphan.txt").write_text("a red circle")
    assert main(["data", "check", str(tmp_path)]) == 0
    assert main(["data", "check", str(tmp_path), "--strict"]) == 1
    assert "orphan" in capsys.readouterr().err
