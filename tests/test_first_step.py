"""First-step mean matching (`sfumato tune --objective mean`): relation variants, renders of a prompt's
scenes, the relation's contrast, the loss and the run."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_distill import sample_carried_unet_in_plain_diffusers
from test_reward_tuning import TINY

from sfumato.cli import main
from sfumato.first_step import (MeanLoss, data_contrast, data_contrasts, model_contrast, relation_variants,
                                scenes_for)
from sfumato.reward_tuning import TuneCfg, tune
from sfumato.shapesworld.checker import judge, parse_prompt

MEAN = dict(TINY, objective="mean", pool=4, renders=2)


def test_variants_turn_the_relation_and_keep_the_wording():
    for text, first in [("a red circle to the left of a blue square", "to the left of"),
                        ("a red circle on top of a blue square", "on top of"),
                        ("a red circle under a large blue square on a black background", "under")]:
        prompt = parse_prompt(text)
        variants = relation_variants(prompt)
        assert variants[0] == prompt and variants[0].relation_phrase == first
        assert sorted(v.relation for v in variants) == ["above", "below", "left", "right"]
        for v in variants:  # each reads back as its relation, the rest of the caption unchanged
            again = parse_prompt(v.text)
            assert again.relation == v.relation and again.objects == prompt.objects
            assert again.background == prompt.background
    prompt = parse_prompt("a red circle")
    assert relation_variants(prompt) == [prompt]


def test_the_scenes_drawn_are_scenes_the_prompt_describes():
    rng = random.Random(0)
    for text in ["a red circle to the left of a big square", "three green triangles", "a blue digit 7"]:
        images = scenes_for(parse_prompt(text), 12, rng)
        assert all(judge(image, text).passed for image in images), text
        assert len({image[0, 0].tobytes() for image in images}) > 1  # the free background is drawn, not fixed
    small = scenes_for(parse_prompt("a red circle above a blue square"), 2, rng, res=32)
    assert small[0].shape == (32, 32, 3)


class PixelVAE:
    """A stand-in encoder whose latents are the images themselves (model range), to read a contrast."""

    device, dtype = "cpu", torch.float32
    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))


def test_the_data_contrast_of_a_relation_points_to_its_side():
    """Red minus blue in the contrast of "red left of blue" lies on the left; of "red above blue", on top;
    a prompt without a relation has none."""
    vae = PixelVAE()
    for text, axis, first_half in [("a red circle to the left of a blue square", 0, True),
                                   ("a red circle to the right of a blue square", 0, False),
                                   ("a red circle above a blue square", 1, True),
                                   ("a red circle below a blue square", 1, False)]:
        c = data_contrast(vae, parse_prompt(text), 32, "test")
        redness = (c[0] - c[2]).mean(axis)  # over rows (columns): a profile along x (y)
        lead, trail = redness[:32].sum(), redness[32:].sum()
        assert (lead > trail) == first_half and abs(lead - trail) > 3, text  # about 11 apart
    assert torch.count_nonzero(data_contrast(vae, parse_prompt("a red circle"), 4, "test")) == 0
    every = data_contrasts(vae, parse_prompt("a red circle over a blue square"), 8, "test")
    assert every.shape == (4, 3, 64, 64) and torch.allclose(every.sum(0), torch.zeros(3, 64, 64), atol=1e-5)
    assert torch.equal(every[0], data_contrast(vae, parse_prompt("a red circle over a blue square"), 8, "test"))


def test_the_model_contrast_is_the_own_variants_mean_less_the_mean_over_variants():
    est = torch.zeros(4, 3, 1, 2, 2)
    est[0] += 3.0
    assert torch.allclose(model_contrast(est), torch.full((1, 2, 2), 2.25))
    assert torch.count_nonzero(model_contrast(torch.ones(4, 3, 1, 2, 2))) == 0  # a model that ignores the relation


def test_the_loss_starts_at_the_shift_and_falls_as_the_first_step_learns_it(carrying):
    import sfumato

    pipe = sfumato.load(carrying, onnx=False)
    loss_fn = MeanLoss(pipe, TuneCfg(**MEAN, categories=("position",)))
    model = pipe.fast_unet.train().requires_grad_(True)
    loss, stats = loss_fn(model, torch.Generator().manual_seed(0))
    # the model is still the reference: its first estimate misses the target by the shift, the later step by nothing
    assert stats["first"] == pytest.approx(stats["shift"], rel=1e-4) and stats["shift"] > 0
    assert stats["keep"] == pytest.approx(0.0, abs=1e-10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)  # 3e-4 overshoots on this tiny random model
    for _ in range(25):
        opt.zero_grad()
        loss_fn(model, torch.Generator().manual_seed(0))[0].backward()
        opt.step()
    assert loss_fn(model, torch.Generator().manual_seed(0))[1]["first"] < 0.75 * stats["first"]


def test_tune_with_the_mean_objective_writes_a_copy_that_plain_diffusers_samples(carrying, tmp_path):
    from sfumato.pipeline import FAST_UNET

    before = (carrying / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes()
    out = tune(carrying, tmp_path / "tuned", TuneCfg(**MEAN), progress=False)
    assert (carrying / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert (out / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes() != before
    record = json.loads((out / "sfumato.json").read_text())["tuned"][-1]
    assert record["config"]["objective"] == "mean" and record["config"]["gain"] == 4.0
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"first", "shift", "keep"} <= set(logged[-1])
    img = sample_carried_unet_in_plain_diffusers(out)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_the_mean_objective_refuses_a_tower_and_a_bad_gain(carrying, tmp_path, capsys):
    for extra, message in [(["--tower-lr", "1e-3"], "trains the few-step UNet only"),
                           (["--gain", "-1"], "tune gain must be between")]:
        argv = ["tune", str(carrying), "--out", str(tmp_path / "a"), "--objective", "mean", *extra]
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_tune_can_grow_the_position_input_first(carrying, tmp_path):
    from diffusers import UNet2DConditionModel

    from sfumato.models import position_kernel
    from sfumato.pipeline import FAST_UNET
    from sfumato.stages import with_position_input

    out = tune(carrying, tmp_path / "grown", TuneCfg(**MEAN, position_input=True), progress=False)
    unet = UNet2DConditionModel.from_pretrained(out / FAST_UNET)  # plain diffusers keys
    assert unet.config.center_input_sample and unet.config.conv_in_kernel == position_kernel(unet.config.sample_size)
    assert with_position_input(unet) is unet  # grown once
    assert not UNet2DConditionModel.load_config(carrying / FAST_UNET).get("center_input_sample")  # the source's own
    img = sample_carried_unet_in_plain_diffusers(out)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
