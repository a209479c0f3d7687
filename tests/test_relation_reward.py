"""The relation reward: its score on renders, its prompts, and training through the sampler."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_distill import QUICK
from test_generate import build_tiny_sd

from sfumato.distill import DistillCfg, distill, student_unet
from sfumato.evaluate import evaluation_prompts
from sfumato.relation_reward import (RelationPrompt, RelationReward, attention_relation_loss, colour_centres,
                                     relation_loss, relation_prompts)
from sfumato.shapesworld import spec
from sfumato.shapesworld.dataset import ShapesWorld


def _renders(n: int, seed: int = 5):
    """Position renders with two different colours, as tensors in 0-1, and their prompts."""
    images, prompts = [], []
    for img, caption, record in ShapesWorld(n, seed=seed, categories=("position",)):
        a, b = record["objects"]
        if a["color"] == b["color"]:
            continue
        rel = next(r for r, words in spec.RELATION_WORDS.items() if any(f" {w} " in caption for w in words))
        images.append(torch.tensor(np.array(img)).permute(2, 0, 1).float() / 255)
        prompts.append(RelationPrompt(caption, (a["color"], b["color"]), rel))
    return torch.stack(images), prompts


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("reward") / "teacher")


FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}


def test_renders_hold_their_relation_and_not_the_flipped_one():
    images, prompts = _renders(80)
    loss, metrics = relation_loss(images, prompts)
    assert metrics["colours_present"] == 1.0
    assert metrics["relation_ok"] >= 0.9 and loss.item() < 0.05
    flipped = [RelationPrompt(p.text, p.colours, FLIP[p.relation]) for p in prompts]
    loss_f, metrics_f = relation_loss(images, flipped)
    assert metrics_f["relation_ok"] <= 0.1 and loss_f.item() > 1.0


def _canvas(*objects, size=64):
    """A white canvas with filled squares: (colour name, x0, y0, side)."""
    img = torch.ones(3, size, size)
    for colour, x, y, side in objects:
        img[:, y:y + side, x:x + side] = torch.tensor(spec.COLORS[colour]).view(3, 1, 1) / 255
    return img[None]


def test_centres_and_masses_of_colours():
    img = _canvas(("red", 4, 10, 12), ("blue", 40, 30, 10))
    centres, mass, spread = colour_centres(img, torch.tensor([[spec.COLORS["red"], spec.COLORS["blue"]]]) / 255)
    assert torch.allclose(centres[0, 0], torch.tensor([9.5, 15.5]), atol=0.1)
    assert torch.allclose(centres[0, 1], torch.tensor([44.5, 34.5]), atol=0.1)
    assert torch.allclose(mass[0], torch.tensor([144.0, 100.0]), atol=1.0)
    assert torch.allclose(spread[0], torch.tensor([[12 / 12**0.5] * 2, [10 / 12**0.5] * 2]), atol=0.05)


def test_two_objects_of_one_colour_are_asked_to_be_one():
    prompt = [RelationPrompt("", ("red", "blue"), "left")]
    one_each = _canvas(("red", 4, 26, 12), ("blue", 40, 26, 12))
    a_second_red = _canvas(("red", 4, 26, 12), ("blue", 40, 26, 12), ("red", 4, 50, 12))
    assert relation_loss(one_each, prompt)[1]["one_object_each"] == 1
    loss, metrics = relation_loss(a_second_red, prompt)
    assert metrics["one_object_each"] == 0 and metrics["relation_ok"] == 0 and loss.item() > 0.3


def test_the_margin_and_the_axis_follow_the_checker():
    red_left_of_blue = RelationPrompt("", ("red", "blue"), "left")
    side_by_side = _canvas(("red", 4, 26, 12), ("blue", 40, 26, 12))
    too_close = _canvas(("red", 20, 26, 12), ("blue", 28, 40, 12))  # 8 px along, 14 across
    diagonal = _canvas(("red", 4, 2, 12), ("blue", 24, 44, 12))  # 20 px along, 42 across
    assert relation_loss(side_by_side, [red_left_of_blue])[0].item() == 0
    for img in (too_close, diagonal):
        loss, metrics = relation_loss(img, [red_left_of_blue])
        assert loss.item() > 0.3 and metrics["relation_ok"] == 0
    assert relation_loss(side_by_side, [RelationPrompt("", ("red", "blue"), "above")])[1]["relation_ok"] == 0


def test_a_faint_colour_is_asked_for_before_any_placement():
    prompt = [RelationPrompt("", ("red", "blue"), "left")]
    one = _canvas(("red", 40, 26, 12))  # no blue at all, red on the wrong side
    loss, metrics = relation_loss(one, prompt)
    assert metrics["colours_present"] == 0 and loss.item() == pytest.approx(1.0, abs=0.01)
    # A washed-out blue square (85 % blue, 15 % white) is too faint to count, and is pulled toward blue.
    blue = torch.tensor(spec.COLORS["blue"]).view(3, 1, 1) / 255
    faint = one.clone()
    faint[0, :, 26:36, 4:14] = 0.85 * blue + 0.15
    img = faint.requires_grad_(True)
    loss, metrics = relation_loss(img, prompt)
    assert metrics["colours_present"] == 0 and 0 < loss.item() < 1
    loss.backward()
    step = -img.grad[0, :, 26:36, 4:14]
    assert (step * (blue - img.detach()[0, :, 26:36, 4:14])).sum() > 0


def test_training_prompts_name_two_colours_and_leave_the_evaluation_prompts_out():
    prompts = relation_prompts(random.Random(0), 3000)
    held = {p for s in (0, 1) for _, p in evaluation_prompts(50, s, ("position",))}
    assert not held & {p.text for p in prompts}
    for p in prompts[:200]:
        a, b = p.colours
        assert a != b and p.text.startswith(f"a {a} ") and f" a {b} " in p.text
        assert any(f" {w} a " in p.text for w in spec.RELATION_WORDS[p.relation])
    assert {p.relation for p in prompts} == set(spec.RELATIONS)


def test_the_reward_trains_through_every_sampler_step(teacher):
    from sfumato.pipeline import load, make_scheduler

    pipe = load(teacher, device="cpu")
    student = student_unet(pipe.unet, 16)
    reward = RelationReward(pipe, make_scheduler("LCM", pipe.scheduler_config), 3, 4.0, 2, seed=0)
    loss, metrics = reward(student, torch.Generator().manual_seed(0))
    loss.backward()
    assert set(metrics) == {"relation_ok", "colours_present", "one_object_each"}
    # The first layers get a gradient, and so does the guidance input, which only the sampler feeds.
    assert student.conv_in.weight.grad.abs().sum() > 0
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in pipe.vae.parameters())


def test_distillation_with_the_reward_logs_both_losses(teacher, tmp_path):
    out = distill(teacher, tmp_path / "fast", DistillCfg(**QUICK, reward_weight=1.0, reward_batch=2), progress=False)
    card = json.loads((out / "sfumato.json").read_text())
    assert card["distilled"]["config"]["reward_weight"] == 1.0
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out, safety_checker=None)  # still a plain diffusers folder


def test_a_bad_reward_setting_is_refused_in_one_line(teacher, tmp_path):
    from sfumato.errors import UsageError

    with pytest.raises(UsageError, match="reward_weight must be between 0 and 1000"):
        distill(teacher, tmp_path / "x", DistillCfg(**QUICK, reward_weight=-1), progress=False)
    assert not (tmp_path / "x").exists()


def test_the_attention_reward_trains_through_the_look_ahead(teacher):
    from sfumato.pipeline import load, make_scheduler

    pipe = load(teacher, device="cpu")
    student = student_unet(pipe.unet, 16)
    reward = RelationReward(pipe, make_scheduler("LCM", pipe.scheduler_config), 4, 4.0, 2, seed=0, target="attention")
    loss, metrics = reward(student, torch.Generator().manual_seed(0))
    loss.backward()
    assert set(metrics) == {"relation_ok"} and loss.item() >= 0
    assert student.conv_in.weight.grad.abs().sum() > 0
    to_k = [p for n, p in student.named_parameters() if n.endswith("attn2.to_k.weight")]
    assert to_k and all(p.grad is not None for p in to_k)


def test_the_attention_hinge_reads_the_head_words():
    from sfumato.layout import Relation

    maps = torch.zeros(1, 8, 64, 64)
    maps[0, 2, 20:30, 4:14] = 1  # token 2 ("circle") on the left
    maps[0, 5, 20:30, 44:54] = 1  # token 5 ("square") on the right
    rel = Relation("left", "circle", "square", (2,), (5,))
    assert attention_relation_loss(maps, [rel])[0].item() == 0
    assert attention_relation_loss(maps, [Relation("right", "circle", "square", (2,), (5,))])[0].item() > 5

