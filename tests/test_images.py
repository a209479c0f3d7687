"""images.py: PNG bytes keep their parameters, saves are whole, npz bytes load back."""

import io

import numpy as np
import pytest
from PIL import Image

from sfumato.errors import UsageError
from sfumato.images import npz_bytes, png_bytes, read_parameters, save_png


def test_png_bytes_keep_the_parameters_chunk():
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    img.info["parameters"] = "a red square\nSteps: 2"
    back = Image.open(io.BytesIO(png_bytes(img)))
    assert back.info["parameters"] == "a red square\nSteps: 2"
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_png_bytes_without_parameters():
    assert "parameters" not in Image.open(io.BytesIO(png_bytes(Image.new("RGB", (4, 4))))).info


def test_save_png_then_read_parameters(tmp_path):
    img = Image.new("RGB", (8, 8))
    img.info["parameters"] = "two blue circles\nSteps: 3, Seed: 1"
    save_png(img, tmp_path / "a.png")
    assert read_parameters(tmp_path / "a.png") == "two blue circles\nSteps: 3, Seed: 1"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


def test_read_parameters_of_a_plain_png(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(UsageError, match="no generation parameters"):
        read_parameters(tmp_path / "plain.png")


def test_npz_bytes_round_trip():
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    z = np.load(io.BytesIO(npz_bytes(words=np.array(["red", "circle"]), maps=maps)))
    assert list(z["words"]) == ["red", "circle"] and np.array_equal(z["maps"], maps)
