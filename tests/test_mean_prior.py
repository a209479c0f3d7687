"""The mean prior (sfumato.mean_prior): the model, its fit, the first-step shift in the sampler, and
`sfumato prior` / `--mean-prior` on a tiny few-step model."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from test_distill import sample_carried_unet_in_plain_diffusers

import sfumato
from sfumato.cli import main
from sfumato.errors import UsageError
from sfumato.mean_prior import MeanPrior, Targets, Variants, centred, contrast_error, fit, fit_into, layout_shift
from sfumato.sampling import shifted_prediction

QUICK = dict(pairs=40, steps=6, batch=8, relations=2)


def test_the_prior_draws_a_layout_and_round_trips_through_safetensors(tmp_path):
    prior = MeanPrior(text_width=16, width=32, heads=2, mix_layers=1, grid=4, sample_size=8).eval()
    states = torch.randn(3, 7, 16)
    with torch.no_grad():
        out = prior(states)
    assert out.shape == (3, 4, 8, 8)
    assert out.mean((-2, -1)).abs().max() < 1e-5  # a layout, not a colour cast
    prior.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "diffusion_pytorch_model.safetensors").is_file()
    again = MeanPrior.from_pretrained(tmp_path / "p").eval()
    with torch.no_grad():
        assert torch.allclose(again(states), out)
    shift = layout_shift(prior, states, 2.0, (16, 16))  # drawn at another size: resized, still centred
    assert shift.shape == (3, 4, 16, 16) and shift.mean((-2, -1)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiple of the grid"):
        MeanPrior(sample_size=10, grid=4)


def test_the_fit_learns_a_layout_the_words_decide_from_noisy_targets():
    """A word after the object says which side its mass lies on; each target is that mean plus much
    more noise (one pair's own placement): the prior learns the mean, for word orders it has not seen."""
    g = torch.Generator().manual_seed(0)
    side = torch.zeros(2, 1, 8, 8)
    side[0, :, :, :4], side[1, :, :, 4:] = 1.0, 1.0
    words = torch.randn(4, 16, generator=g)  # 0, 1: two objects; 2, 3: "left", "right"

    def targets(n, noise):
        obj, rel = torch.randint(2, (n,), generator=g), torch.randint(2, (n,), generator=g)
        states = torch.randn(n, 5, 16, generator=g) * 0.1
        states[:, 1], states[:, 3] = words[obj], words[2 + rel]
        res = centred((obj * 2 - 1).float()[:, None, None, None] * side[rel].expand(n, 4, 8, 8))
        return Targets(states, res + noise * torch.randn(res.shape, generator=g)), res

    train, _ = targets(2000, 2.0)
    held, clean = targets(200, 2.0)
    prior = MeanPrior(text_width=16, width=32, heads=2, mix_layers=1, grid=4, sample_size=8)
    stats = fit(train, held, prior, steps=300, batch=64, lr=3e-3)
    assert stats["held_mse"] < stats["held_mse_zero"]
    with torch.no_grad():
        got = prior(held.states)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), clean.flatten(1)).mean()
    assert cos > 0.8, cos


def test_relation_variants_teach_the_contrast_the_noisy_pairs_bury():
    """What the relation word changes is small beside one pair's own placement: fitted on the pairs
    alone the prior does not learn it; with groups that differ only in the relation word (their render
    noise shared, so it cancels in the contrast) it does, and it still fits the pairs."""
    g = torch.Generator().manual_seed(1)
    side = torch.zeros(2, 1, 8, 8)
    side[0, :, :, :4], side[1, :, :, 4:] = 1.0, 1.0
    words = torch.randn(4, 16, generator=g)  # 0, 1: two objects; 2, 3: "left", "right"

    def states(obj, rel):
        s = torch.randn(len(obj), 5, 16, generator=g) * 0.1
        s[:, 1], s[:, 3] = words[obj], words[2 + rel]
        return s

    def mean(obj, rel):  # the object decides a top/bottom layout, the relation a weak left/right one
        top = torch.zeros(len(obj), 4, 8, 8)
        top[:, :, :4] = (obj * 2 - 1).float()[:, None, None, None]
        return centred(top + 0.15 * side[rel].expand(len(obj), 4, 8, 8))

    obj, rel = torch.randint(2, (3000,), generator=g), torch.randint(2, (3000,), generator=g)
    pairs = Targets(states(obj, rel), mean(obj, rel) + 3.0 * torch.randn(3000, 4, 8, 8, generator=g))
    gobj = torch.randint(2, (400,), generator=g).repeat_interleave(2)
    grel = torch.tensor([0, 1]).repeat(400)
    shared = torch.randn(400, 1, 4, 8, 8, generator=g).expand(400, 2, 4, 8, 8)  # one render noise a group
    variants = Variants(states(gobj, grel).view(400, 2, 5, 16), mean(gobj, grel).view(400, 2, 4, 8, 8) + shared)
    kw = dict(steps=300, batch=32, lr=3e-3)
    alone = MeanPrior(text_width=16, width=32, heads=2, mix_layers=1, grid=4, sample_size=8)
    assert "held_contrast_mse" not in fit(pairs, None, alone, **kw)
    both = fit(pairs, None, MeanPrior(text_width=16, width=32, heads=2, mix_layers=1, grid=4, sample_size=8),
               variants=variants, group_batch=8, **kw)
    held = Variants(variants.states[:20], variants.residuals[:20])  # the groups `fit` held out
    assert contrast_error(alone, held)["held_contrast_mse"] > 0.7 * both["held_contrast_mse_zero"]
    assert both["held_contrast_mse"] < 0.3 * both["held_contrast_mse_zero"], both
    assert both["train_mse"] < both["train_mse_zero"]


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "sample"])
def test_a_shifted_prediction_moves_the_clean_estimate_by_the_shift(kind):
    from diffusers import DDIMScheduler

    from sfumato.diffusion import predicted_x0

    sched = DDIMScheduler(prediction_type=kind)
    x, pred, shift = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = 700
    a = sched.alphas_cumprod[t]
    moved = shifted_prediction(pred, shift, x, sched, torch.tensor(t))
    if kind == "sample":
        assert torch.allclose(moved, pred + shift)
    else:
        assert torch.allclose(predicted_x0(kind, x, moved, a) - predicted_x0(kind, x, pred, a), shift, atol=1e-4)


@pytest.fixture(scope="module")
def with_prior(carrying, tmp_path_factory):
    """A copy of the tiny carrying model with a mean prior fitted into it."""
    model = tmp_path_factory.mktemp("prior") / "model"
    shutil.copytree(carrying, model)
    fit_into(model, progress=False, gain=3.0, **QUICK)
    return model


def test_sfumato_prior_writes_the_prior_and_the_default_gain(with_prior, carrying):
    card = json.loads((with_prior / "sfumato.json").read_text())
    assert card["generation"]["mean_prior"] == 3.0
    assert card["mean_prior"]["pairs"] == QUICK["pairs"] and card["mean_prior"]["unet"] == "unet_lcm"
    assert card["mean_prior"]["relations"] == 2 and card["mean_prior"]["relation_weight"] == 10.0
    assert card["mean_prior"]["train_mse_zero"] == 0  # captions naming no relation: the prior stays at zero
    assert (with_prior / "mean_prior" / "diffusion_pytorch_model.safetensors").is_file()
    assert not any(p.name.endswith(".partial") for p in with_prior.iterdir())
    pipe = sfumato.load(with_prior)
    assert isinstance(pipe.prior, MeanPrior)
    s = pipe.settings("a red circle to the left of a blue square")
    assert s.mean_prior == 3.0 and s.scheduler == "LCM"
    assert pipe.settings("a red circle", scheduler="DDIM").mean_prior == 0  # fitted to the few-step UNet only
    # the shift is what changes the picture: without it the model draws as before it had a prior
    on = np.asarray(pipe.generate(s)[0])
    off = pipe.generate(pipe.settings(s.prompt, mean_prior=0))[0]
    before = sfumato.load(carrying).generate(sfumato.load(carrying).settings(s.prompt))[0]
    assert np.array_equal(np.asarray(off), np.asarray(before))
    assert not np.array_equal(on, np.asarray(off))
    assert "Mean prior: 3" in pipe.generate(s)[0].info["parameters"]
    assert "Mean prior" not in off.info["parameters"]
    # plain diffusers ignores the folder
    img = sample_carried_unet_in_plain_diffusers(with_prior)
    assert img.shape == (1, 32, 32, 3)


def test_without_relations_it_is_the_plain_fit_at_its_own_default_gain(carrying, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    record = fit_into(model, progress=False, **{**QUICK, "relations": 0})
    assert record["relations"] == 0 and record["gain"] == 4.0 and "held_contrast_mse" not in record
    assert record["train_mse_zero"] > 0  # the pairs' own targets, not the relation fit's zero anchors


def test_mean_prior_mistakes_are_one_line(with_prior, carrying, tmp_path, capsys):
    pipe = sfumato.load(carrying)
    with pytest.raises(UsageError, match="has no mean prior"):
        pipe.generate(pipe.settings("a red circle", mean_prior=2))
    pipe = sfumato.load(with_prior)
    with pytest.raises(UsageError, match="few-step UNet"):
        pipe.generate(pipe.settings("a red circle", scheduler="DDIM", mean_prior=2))
    with pytest.raises(UsageError, match="between 0 and 16"):
        pipe.generate(pipe.settings("a red circle", mean_prior=40))
    assert main(["prior", str(with_prior)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["prior", str(with_prior), "--gain", "0", "--overwrite"]) == 2
    assert "--gain must be above 0" in capsys.readouterr().err
    assert main(["prior", str(with_prior), "--data", str(tmp_path), "--relations", "5", "--overwrite"]) == 2
    assert "needs --data shapesworld" in capsys.readouterr().err
    assert main(["prior", str(with_prior), "--relations", "-1", "--overwrite"]) == 2
    assert "--relations must be at least 0" in capsys.readouterr().err
    from sfumato.shapesworld.spec import CATEGORIES

    mix = ",".join(f"{c}=0" for c in CATEGORIES if c != "position")
    assert main(["prior", str(with_prior), "--mix", mix, "--overwrite"]) == 2
    assert "needs captions that name no relation" in capsys.readouterr().err


def test_a_full_model_has_no_first_step_to_move(tmp_path):
    from test_generate import build_tiny_sd

    model = build_tiny_sd(tmp_path / "full")
    with pytest.raises(UsageError, match="distil one first"):
        fit_into(model, progress=False, **QUICK)
    assert not (model / "mean_prior").exists()


def test_an_interrupted_fit_leaves_the_model_as_it_was(carrying, tmp_path, monkeypatch):
    import sfumato.mean_prior as mp

    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    card = (model / "sfumato.json").read_text()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mp, "fit", stop)
    with pytest.raises(KeyboardInterrupt):
        fit_into(model, progress=False, **QUICK)
    assert not (model / "mean_prior").exists() and (model / "sfumato.json").read_text() == card


def test_a_prior_fitted_to_another_unet_is_called_stale(with_prior, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(with_prior, model)
    path = model / "unet_lcm" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sfumato.load(model)
    assert any("fit it again" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sfumato.load(with_prior)
    assert not any("fit it again" in str(w.message) for w in caught)
