"""Reward tuning: prompts, the checker's reward, the sampler as a policy, and `sfumato tune` end to end."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from test_distill import sample_carried_unet_in_plain_diffusers
from test_generate import build_tiny_sd

from sfumato.cli import main
from sfumato.errors import UsageError
from sfumato.evaluate import evaluation_prompts
from sfumato.reward_tuning import (Drawn, FewStepPolicy, PolicyLoss, RepairLoss, TuneCfg, WithTower, antithetic_noise,
                                   group_advantages, training_prompts, tune, verdict_reward)
from sfumato.shapesworld.checker import parse_prompt
from sfumato.shapesworld.dataset import ShapesWorld

TINY = dict(steps=2, prompts=2, group=4, checkpoint_every=1)


def bright(image, prompt):
    """A reward every tiny random model earns in part: the image's mean brightness."""
    return float(image.mean() / 255), False


def test_training_prompts_leave_the_evaluation_prompts_out():
    held = {p for s in (0, 1) for _, p in evaluation_prompts(50, s)}
    drawn = training_prompts(random.Random(0), 600, ("position", "attribute_binding"))
    assert [c for c, _ in drawn[:4]] == ["position", "attribute_binding"] * 2
    assert not held & {p for _, p in drawn}
    assert len({p for _, p in drawn}) > 400  # not a handful of prompts over and over
    # a category whose every prompt the evaluation draws cannot be trained on without them
    with pytest.raises(UsageError, match="single_object prompts are all prompts of the held-out"):
        training_prompts(random.Random(0), 10, ("single_object",))


def test_the_reward_is_the_checkers_verdict():
    """A render earns 1 for its caption; mirrored across its relation it keeps its objects and loses
    the relation (the partial reward); an empty canvas earns nothing."""
    seen = 0
    for img, caption, _ in ShapesWorld(40, seed=3, categories=("position",)):
        prompt = parse_prompt(caption)
        if prompt.relation not in ("left", "right"):
            continue
        image = np.asarray(img)
        assert verdict_reward(image, prompt, 0.5) == (1.0, True)
        assert verdict_reward(np.ascontiguousarray(image[:, ::-1]), prompt, 0.5) == (0.5, False)
        assert verdict_reward(np.full_like(image, 255), prompt, 0.5) == (0.0, False)
        seen += 1
    assert seen >= 5


def test_advantages_compare_a_sample_with_its_own_group():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.all(adv[0, [0, 3]] > 0) and torch.all(adv[0, [1, 2]] < 0)
    assert torch.all(adv[1] == 0)  # a group judged alike teaches nothing
    assert torch.allclose(adv[0].sum(), torch.zeros(()))


def test_antithetic_noise_mirrors_each_group_along_its_axis():
    axes = torch.tensor([3, 2])
    n = antithetic_noise((4, 8, 8), axes, 4, torch.Generator().manual_seed(0))
    assert n.shape == (8, 4, 8, 8)
    assert torch.equal(n[2:4], n[0:2].flip(3)) and torch.equal(n[6:8], n[4:6].flip(2))
    assert not torch.equal(n[0], n[1])


def test_the_policy_takes_the_steps_diffusers_lcm_takes(carrying):
    import sfumato
    from sfumato.pipeline import make_scheduler
    from sfumato.sampling import denoise, encode_prompts

    pipe = sfumato.load(carrying, onnx=False)
    ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle above a blue square"] * 2).float()
    policy = FewStepPolicy(make_scheduler("LCM", pipe.scheduler_config), 4, 4.0,
                           pipe.fast_unet.config.time_cond_proj_dim)
    draws = torch.randn(4, 2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    k = iter(draws)
    latents, taken = policy.sample(pipe.fast_unet, ctx, lambda: next(k))
    assert len(taken) == 3 and [t for _, t, _, _ in taken] == policy.timesteps[:3]

    import diffusers.schedulers.scheduling_lcm as lcm_module

    # diffusers' LCMScheduler draws each step's noise itself: hand it the policy's draws in turn

    k2 = iter(draws[1:])
    real = lcm_module.randn_tensor
    lcm_module.randn_tensor = lambda *a, **kw: next(k2)
    try:
        ref = denoise(pipe.fast_unet, make_scheduler("LCM", pipe.scheduler_config), ctx, ctx, draws[0], 4, 4.0)
    finally:
        lcm_module.randn_tensor = real
    assert torch.allclose(latents, ref, atol=1e-5)


def test_an_update_makes_the_rewarded_steps_more_likely(carrying):
    """One small gradient step on the objective raises the advantage-weighted log-probability of the
    steps the samples took: the loss is the policy gradient, not its opposite."""
    import sfumato

    pipe = sfumato.load(carrying, onnx=False)
    loss_fn = PolicyLoss(pipe, TuneCfg(**TINY), reward_fn=bright, steps=4)
    model = pipe.fast_unet.train().requires_grad_(True)
    batch = loss_fn.draw(model, torch.Generator().manual_seed(0))
    assert len(batch.live) > 0

    def score():
        with torch.no_grad():
            return -loss_fn.objective(model, batch)[0].item()

    before = score()
    loss, _ = loss_fn.objective(model, batch)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
    assert score() > before


def test_tune_writes_a_copy_that_plain_diffusers_samples(carrying, tmp_path):
    from sfumato.pipeline import FAST_UNET

    before = (carrying / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes()
    out = tune(carrying, tmp_path / "tuned", TuneCfg(**TINY), progress=False, reward_fn=bright)
    assert (carrying / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes() == before  # source untouched
    assert (out / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes() != before
    card = json.loads((out / "sfumato.json").read_text())
    assert card["tuned"][-1]["config"]["categories"] == ["position"] and card["tuned"][-1]["unet"] == FAST_UNET
    assert "tuned" not in json.loads((carrying / "sfumato.json").read_text())
    assert not (tmp_path / "tuned.partial").exists()
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and 0 <= logged[-1]["reward"] <= 1  # the run's rewards stay with the copy
    img = sample_carried_unet_in_plain_diffusers(out)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_tune_in_place_replaces_only_the_few_step_unet(carrying, tmp_path):
    from sfumato.pipeline import FAST_UNET

    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    full = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    fast = (model / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes()
    tune(model, None, TuneCfg(**TINY), in_place=True, progress=False, reward_fn=bright)
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == full
    assert (model / FAST_UNET / "diffusion_pytorch_model.safetensors").read_bytes() != fast
    assert len(json.loads((model / "sfumato.json").read_text())["tuned"]) == 1
    assert sorted(p.name for p in model.iterdir() if "partial" in p.name or p.name.startswith(".")) == []


def test_a_tower_trained_along_is_written_with_the_unet_and_the_source_keeps_its_own(carrying, tmp_path):
    from sfumato.pipeline import FAST_UNET

    tower = (carrying / "text_encoder" / "model.safetensors").read_bytes()
    out = tune(carrying, tmp_path / "tuned", TuneCfg(**TINY, tower_lr=1e-3), progress=False, reward_fn=bright)
    assert (carrying / "text_encoder" / "model.safetensors").read_bytes() == tower
    assert (out / "text_encoder" / "model.safetensors").read_bytes() != tower
    assert json.loads((out / "sfumato.json").read_text())["tuned"][-1]["config"]["tower_lr"] == 1e-3
    img = sample_carried_unet_in_plain_diffusers(out)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    tune(model, None, TuneCfg(**TINY, tower_lr=1e-3), in_place=True, progress=False, reward_fn=bright)
    assert (model / "text_encoder" / "model.safetensors").read_bytes() != tower
    assert (model / FAST_UNET / "config.json").exists() and not list(model.glob("*.partial"))


def test_the_reach_term_teaches_the_tower_to_carry_the_relation_past_its_word(carrying):
    import sfumato

    pipe = sfumato.load(carrying, onnx=False)
    loss_fn = PolicyLoss(pipe, TuneCfg(**TINY, tower_lr=1e-3, reach=1.0, reach_target=5.0), reward_fn=bright)
    model = WithTower(pipe.fast_unet, pipe.text_encoder.requires_grad_(True))
    batch = Drawn(None, [], torch.zeros(1), torch.zeros(1), [],
                  prompts=["a red circle to the left of a blue square", "a green cross over a red square", "a red circle"])
    loss, stats = loss_fn.reach_loss(model, batch)
    assert loss.item() > 0 and 0 <= stats["reach"] < 5.0
    opt = torch.optim.Adam(model.text_encoder.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        loss_fn.reach_loss(model, batch)[0].backward()
        opt.step()
    assert loss_fn.reach_loss(model, batch)[1]["reach"] > stats["reach"] + 0.1  # the words after it now differ more
    assert loss_fn.reach_loss(pipe.fast_unet, batch)[0].item() == 0  # a frozen tower has nothing to learn here


def test_bad_requests_are_refused_in_one_line_and_write_nothing(carrying, tmp_path, capsys):
    teacher = build_tiny_sd(tmp_path / "teacher")
    cases = [
        (["tune", str(carrying), "--out", str(tmp_path / "a"), "--lr", "-1"], "tune lr must be between"),
        (["tune", str(carrying), "--out", str(tmp_path / "a"), "--group", "5"], "group must be even"),
        (["tune", str(carrying), "--out", str(tmp_path / "a"), "--categories", "colours"], "unknown category colours"),
        (["tune", str(carrying), "--out", str(tmp_path / "a"), "--objective", "regress"], "objective must be one of"),
        (["tune", str(carrying), "--out", str(tmp_path / "a"), "--reach", "1"], "give a tower learning rate"),
        (["tune", str(carrying)], "either --out"),
        (["tune", str(carrying), "--in-place", "--out", str(tmp_path / "a")], "either --out"),
        (["tune", str(teacher), "--out", str(tmp_path / "a")], "has no few-step UNet"),
        (["tune", str(carrying), "--out", str(carrying)], "another folder"),
    ]
    for argv, message in cases:
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_the_kl_term_is_zero_at_the_start_and_grows_as_the_unet_moves(carrying):
    import sfumato

    pipe = sfumato.load(carrying, onnx=False)
    loss_fn = PolicyLoss(pipe, TuneCfg(**TINY, kl=1.0), reward_fn=bright, steps=4)
    model = pipe.fast_unet
    batch = loss_fn.draw(model, torch.Generator().manual_seed(0))
    assert loss_fn.objective(model, batch)[1] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert loss_fn.objective(model, batch)[1] > 0


def test_a_wrong_relation_is_repaired_by_the_smallest_move_of_one_object():
    """Mirrored across its relation, a render keeps its objects and loses the relation; the repair
    holds it again, with one object where the mirror put it. Scenes with the wrong objects have no
    repair."""
    from sfumato.shapesworld.checker import check, parse_image
    from sfumato.shapesworld.repair import repair_relation

    seen = kept = 0
    for img, caption, _ in ShapesWorld(60, seed=5, categories=("position",)):
        prompt = parse_prompt(caption)
        axis = 1 if prompt.relation in ("left", "right") else 0
        if prompt.relation in ("above", "below") and any(o.shape == "triangle" for o in prompt.objects):
            continue  # a triangle turned upside down is not a triangle
        wrong = parse_image(np.ascontiguousarray(np.flip(np.asarray(img), axis)))
        assert not check(wrong, prompt).passed
        fixed = repair_relation(wrong, prompt)
        assert fixed is not None and fixed.size == img.size
        after = parse_image(fixed)
        assert check(after, prompt).passed
        stayed = [min(np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) for b in wrong.objects)
                  for a in after.objects]
        across = axis  # or, with no room to move one, the two traded places along the axis
        traded = np.allclose(sorted(o.center[across] for o in after.objects),
                             sorted(o.center[across] for o in wrong.objects), atol=1.0)
        assert min(stayed) <= 1.0 or traded
        kept += min(stayed) <= 1.0
        seen += 1
    assert seen >= 20 and 0 < kept < seen  # both kinds of repair occur
    blank = parse_image(np.full((64, 64, 3), 255, np.uint8))
    assert repair_relation(blank, parse_prompt("a red circle left of a blue square")) is None
    one = parse_image(np.asarray(ShapesWorld(1, seed=0, categories=("single_object",))[0][0]))
    assert repair_relation(one, parse_prompt("a red circle left of a blue square")) is None


def test_repair_prefers_the_repair_and_the_passing_sample_over_the_failed_one(carrying, monkeypatch):
    """A failed sample with a repair is paired with it along the same noise; one without, with a
    passing sample of its group. The preference loss starts at log 2 (the UNet is its reference)
    and a gradient step lowers it on the same draws."""
    import sfumato
    import sfumato.shapesworld.repair as repair
    from PIL import Image

    pipe = sfumato.load(carrying, onnx=False)
    verdicts = iter([(1.0, True), (0.5, False), (0.0, False), (0.5, False)] * 2)
    cfg = TuneCfg(**TINY, objective="repair", mirror=False)
    loss_fn = RepairLoss(pipe, cfg, reward_fn=lambda image, prompt: next(verdicts), steps=4)
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    fixes = iter([red, None, None, red, None, None])  # asked of each sample that did not pass, in turn
    monkeypatch.setattr(repair, "repair_relation", lambda scene, prompt: next(fixes))
    model = pipe.fast_unet.train().requires_grad_(True)
    batch = loss_fn.draw(model, torch.Generator().manual_seed(0))
    assert len(batch.noises) == 4 and torch.equal(batch.noises[0], batch.taken[0][0])  # the starting noise first
    (z_win, rows_win), (z_lose, rows_lose), repaired = loss_fn.pairs(batch)
    assert rows_win.tolist() == [1, 0, 0, 5, 4, 4] and rows_lose.tolist() == [1, 2, 3, 5, 6, 7] and repaired == 2
    assert not torch.equal(z_win[0], batch.latents[1]) and torch.equal(z_win[1], batch.latents[0])
    assert torch.equal(z_lose, batch.latents[rows_lose])

    monkeypatch.setattr(loss_fn, "draw", lambda model, g: batch)
    monkeypatch.setattr(loss_fn, "pairs", lambda batch: ((z_win, rows_win), (z_lose, rows_lose), repaired))
    loss, stats = loss_fn(model, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6) and stats["repaired"] == 2 / 8
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
    after, stats = loss_fn(model, torch.Generator().manual_seed(0))
    assert after.item() < loss.item() and stats["margin"] > 0
