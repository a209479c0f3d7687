"""Compositional evaluation: prompts per category, the summary, the files written, and oracle checks."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfumato import evaluate
from sfumato.cli import main
from sfumato.evaluate import evaluate_compositional, evaluation_prompts, summarize
from sfumato.shapesworld import Obj, Scene, render, spec
from sfumato.shapesworld.checker import parse_prompt
from sfumato.shapesworld.render import place
from test_generate import build_tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from diffusers' schedulers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


# ---------------------------------------------------------------- prompts


def test_evaluation_prompts_cover_every_category():
    prompts = evaluation_prompts(3, seed=0)
    assert Counter(c for c, _ in prompts) == {c: 3 for c in spec.CATEGORIES}
    assert prompts == evaluation_prompts(3, seed=0)  # deterministic
    assert prompts != evaluation_prompts(3, seed=1)
    assert len({p for _, p in prompts}) > len(spec.CATEGORIES)  # not one prompt repeated per category
    assert {c for c, _ in evaluation_prompts(2, categories=("colors", "text"))} == {"colors", "text"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_evaluation_prompt_parses_and_fits_its_category(seed):
    for category, prompt in evaluation_prompts(10, seed=seed):
        p = parse_prompt(prompt)  # raises ValueError outside the grammar
        shapes = [o.shape for o in p.objects]
        if category in ("single_object", "colors", "size", "background"):
            assert len(p.objects) == 1 and shapes[0] in spec.SHAPES, prompt
        if category == "colors":
            assert p.objects[0].color in spec.COLORS, prompt
        if category == "size":
            assert p.objects[0].size in spec.SIZES, prompt
        if category == "background":
            assert p.background in spec.BACKGROUNDS and p.objects[0].color, prompt
        if category == "two_objects":
            assert len(p.objects) == 2 and shapes[0] != shapes[1], prompt
        if category == "counting":
            assert 2 <= len(p.objects) <= spec.MAX_OBJECTS and len(set(p.objects)) == 1, prompt
        if category == "position":
            assert len(p.objects) == 2 and p.relation in spec.RELATIONS, prompt
        if category == "attribute_binding":
            assert len(p.objects) == 2 and p.objects[0].color != p.objects[1].color, prompt
        if category == "text":
            assert shapes == ["digit"] and p.objects[0].digit in range(10) and p.objects[0].color, prompt


# ---------------------------------------------------------------- summary


def test_summarize_is_the_mean_of_category_rates():
    verdicts = ([{"category": "colors", "pass": p} for p in (True, False)]
                + [{"category": "text", "pass": p} for p in (True, True, True)]
                + [{"category": "counting", "pass": p} for p in (False, False, False, True)])
    s = summarize(verdicts)
    assert s["per_category"] == {"colors": 0.5, "text": 1.0, "counting": 0.25}
    assert s["overall"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)  # not 6/9, the pooled rate
    assert s["counts"] == {"colors": 2, "text": 3, "counting": 4}
    assert summarize([])["overall"] == 0.0


# ---------------------------------------------------------------- the tiny model end to end


def test_evaluate_compositional_writes_results(model_dir, tmp_path):
    import sfumato

    pipe = sfumato.load(model_dir)
    out = tmp_path / "eval"
    r = evaluate_compositional(pipe, out, per_category=1, seed=0, steps=2, progress=False)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["overall"] == pytest.approx(r["overall"])
    assert set(saved["per_category"]) == set(spec.CATEGORIES)
    assert saved["overall"] == pytest.approx(sum(saved["per_category"].values()) / len(spec.CATEGORIES))
    assert 0.0 <= saved["overall"] <= 1.0 and saved["steps"] == 2 and saved["model_hash"] == pipe.hash
    rows = [json.loads(l) for l in (out / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(v["category"], v["prompt"]) for v in rows] == evaluation_prompts(1, seed=0)
    for v in rows:
        assert isinstance(v["pass"], bool) and isinstance(v["reason"], str) and v["reason"]
        assert not Path(v["file"]).is_absolute() and (out / v["file"]).is_file()
        with Image.open(out / v["file"]) as im:
            assert im.size == (pipe.native, pipe.native) and v["prompt"] in im.info["parameters"]
    for c in spec.CATEGORIES:
        assert (out / f"grid-{c}.png").is_file(), c
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_eval_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "compositional", "--model", str(model_dir), "--per-category", "1", "--steps", "1",
                 "--category", "colors", "--category", "text", "--out", str(out)]) == 0
    assert "overall" in capsys.readouterr().out
    assert set(json.loads((out / "results.json").read_text())["per_category"]) == {"colors", "text"}
    assert main(["eval", "compositional", "--model", str(model_dir), "--category", "colours",
                 "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "colours" in err and "Traceback" not in err


# ---------------------------------------------------------------- oracle and blank generators


def scene_for(prompt: str, seed: int) -> Scene:
    """A ShapesWorld scene that satisfies `prompt`: what the caption leaves free is drawn at random."""
    want = parse_prompt(prompt)
    rng = random.Random(f"oracle/{seed}/{prompt}")
    objs = []
    for o in want.objects:
        color = o.color or rng.choice(tuple(spec.COLORS))
        if o.shape == "digit":
            objs.append(Obj("digit", color, None, o.digit))
        else:
            objs.append(Obj(o.shape, color, o.size or rng.choice(tuple(spec.SIZES))))
    assert any(place(rng, objs, want.relation) for _ in range(100)), prompt
    return Scene(want.background or rng.choice(tuple(spec.BACKGROUNDS)), objs, "oracle", prompt)


class FakePipe:
    """Stands in for sfumato.pipeline.Pipeline in evaluate_compositional."""

    folder, hash, native = Path("fake"), "0000000000", 64

    def __init__(self, draw):
        self.draw, self.calls = draw, []

    def settings(self, prompt, **given):
        from sfumato.config import GenerationSettings

        return GenerationSettings(prompt, **{k: v for k, v in given.items() if v is not None})

    def generate(self, settings, n=1, **kw):
        self.calls.append((settings.prompt, settings.seed, settings.steps))
        return [self.draw(settings.prompt, settings.seed + i) for i in range(n)]


def test_perfect_generator_scores_one(tmp_path):
    pipe = FakePipe(lambda prompt, seed: render(scene_for(prompt, seed), 64))
    r = evaluate_compositional(pipe, tmp_path / "oracle", per_category=4, seed=0, steps=3, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "oracle" / "verdicts.jsonl").read_text().splitlines()]
    failed = [(v["prompt"], v["reason"]) for v in rows if not v["pass"]]
    assert not failed, failed
    assert r["per_category"] == {c: 1.0 for c in spec.CATEGORIES} and r["overall"] == 1.0
    assert len(pipe.calls) == 4 * len(spec.CATEGORIES) and {s for _, _, s in pipe.calls} == {3}
    assert [seed for _, seed, _ in pipe.calls] == list(range(len(pipe.calls)))


@pytest.mark.parametrize("background", ["black", "white", "gray"])
def test_blank_generator_scores_zero(tmp_path, background):
    pipe = FakePipe(lambda prompt, seed: Image.new("RGB", (64, 64), spec.BACKGROUNDS[background]))
    r = evaluate_compositional(pipe, tmp_path / "blank", per_category=2, seed=5, progress=False)
    assert r["per_category"] == {c: 0.0 for c in spec.CATEGORIES} and r["overall"] == 0.0


def test_wrong_attribute_generator_fails_colors(tmp_path):
    """An image with the right shape in the wrong colour fails the colour category."""
    def wrong_color(prompt, seed):
        scene = scene_for(prompt, seed)
        for o in scene.objects:
            o.color = next(c for c in spec.COLORS if c != o.color)
        return render(scene, 64)

    r = evaluate_compositional(FakePipe(wrong_color), tmp_path / "wrong", per_category=3, seed=0,
                               categories=("colors", "attribute_binding", "single_object"), progress=False)
    assert r["per_category"]["colors"] == 0.0 and r["per_category"]["attribute_binding"] == 0.0
    assert r["per_category"]["single_object"] == 1.0  # colour unnamed there
    assert r["overall"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- metrics


def test_pointing_hit():
    m = np.zeros((64, 64))
    m[20, 10] = 1  # peak at x=10, y=20
    assert evaluate.pointing_hit(m, (8, 18, 12, 22))
    assert evaluate.pointing_hit(m, (10, 20, 11, 21))  # the pixel's centre (10.5, 20.5) is inside
    assert not evaluate.pointing_hit(m, (0, 0, 5, 5))
    assert not evaluate.pointing_hit(m, (8, 18, 10, 22))  # x1 is exclusive
    assert not evaluate.pointing_hit(m, (20, 10, 24, 14))  # x and y swapped
    big = np.zeros((128, 128))
    big[40, 20] = 1
    assert evaluate.pointing_hit(big, (8, 18, 12, 22), scale=2.0)
    assert not evaluate.pointing_hit(big, (8, 18, 12, 22))


def test_mask_iou():
    m = np.zeros((8, 8))
    m[2:6, 2:6] = 0.9
    assert evaluate.mask_iou(m, (2, 2, 6, 6)) == pytest.approx(1.0)
    assert evaluate.mask_iou(m, (4, 2, 8, 6)) == pytest.approx(8 / 24)  # [x0, y0, x1, y1)
    assert evaluate.mask_iou(m, (6, 6, 8, 8)) == pytest.approx(0.0)
    assert evaluate.mask_iou(m, (2, 2, 6, 6), threshold=0.95) == pytest.approx(0.0)
    assert evaluate.mask_iou(m, (1, 1, 3, 3), scale=2.0) == pytest.approx(1.0)
    assert evaluate.mask_iou(np.zeros((8, 8)), (0, 0, 0, 0)) == 0.0  # nothing on either side
    band = np.zeros((8, 8))
    band[2:4, :] = 1  # rows y=2..3, every x
    assert evaluate.mask_iou(band, (0, 2, 8, 4)) == pytest.approx(1.0)  # boxes are [x0, y0, x1, y1)
    assert evaluate.mask_iou(band, (2, 0, 4, 8)) == pytest.approx(4 / 28)


def test_psnr():
    import torch

    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert evaluate.psnr(a, a) == pytest.approx(10 * math.log10(255.0 ** 2 / 1e-10))  # MSE floored
    b = a + 10
    assert evaluate.psnr(a, b) == pytest.approx(10 * math.log10(255.0 ** 2 / 100))
    assert evaluate.psnr(a, torch.full_like(a, 255)) == pytest.approx(0.0)
