"""`sfumato distill`: latent consistency distillation of a tiny model, end to end."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_generate import build_tiny_sd

from sfumato.cli import main
from sfumato.distill import FAST_STEPS, DistillCfg, distill, student_unet
from sfumato.sampling import guidance_embedding
from sfumato.errors import UsageError

QUICK = dict(steps=4, batch_size=2, pairs=24, checkpoint_every=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("distill") / "teacher")


@pytest.fixture(scope="module")
def fast(teacher, tmp_path_factory):
    return distill(teacher, tmp_path_factory.mktemp("distill-out") / "fast", DistillCfg(**QUICK), progress=False)


def test_the_student_starts_as_the_teacher(teacher):
    import sfumato

    unet = sfumato.load(teacher).unet
    student = student_unet(unet, 256)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 16, 32)
    with torch.no_grad():
        a = unet(x, t, encoder_hidden_states=ctx).sample
        b = student(x, t, timestep_cond=guidance_embedding(torch.tensor([4.0, 7.0]), 256),
                    encoder_hidden_states=ctx).sample
    assert torch.allclose(a, b, atol=1e-6)


def test_the_distilled_folder_samples_in_plain_diffusers(fast):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = StableDiffusionPipeline.from_pretrained(fast, safety_checker=None)
        lcm = LatentConsistencyModelPipeline.from_pretrained(fast, safety_checker=None, requires_safety_checker=False)
    assert isinstance(sd.scheduler, LCMScheduler) and sd.unet.config.time_cond_proj_dim == 256
    for pipe in (sd, lcm):
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 32, 32, 3) and img.std() > 0
    card = json.loads((fast / "sfumato.json").read_text())
    assert card["generation"]["steps"] == FAST_STEPS and card["generation"]["scheduler"] == "LCM"
    assert card["distilled"]["config"]["steps"] == QUICK["steps"]
    assert not (fast.parent / "fast.partial").exists()


def test_distillation_changes_the_student(teacher, fast):
    from safetensors.torch import load_file

    before = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(fast / "unet" / "diffusion_pytorch_model.safetensors"))
    assert after["time_embedding.cond_proj.weight"].abs().sum() > 0  # the guidance input was learnt
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_an_interrupted_run_resumes(teacher, tmp_path, monkeypatch):
    import sfumato.distill as d

    real = d.ConsistencyLoss.__call__
    calls = {"n": 0}

    def stop_after_three(self, model, idx, g):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(self, model, idx, g)

    monkeypatch.setattr(d.ConsistencyLoss, "__call__", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, tmp_path / "fast", DistillCfg(**QUICK), progress=False)
    assert (tmp_path / "fast.partial" / "checkpoints" / "distill").is_dir() and not (tmp_path / "fast").exists()
    with pytest.raises(UsageError, match="unfinished run"):
        distill(teacher, tmp_path / "fast", DistillCfg(**QUICK), progress=False)
    monkeypatch.setattr(d.ConsistencyLoss, "__call__", real)
    calls["n"] = 0
    out = distill(teacher, tmp_path / "fast", DistillCfg(**QUICK), resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == QUICK["steps"]


def test_bad_requests_are_refused_in_one_line(teacher, fast, tmp_path, capsys):
    assert main(["distill", str(fast), "--out", str(tmp_path / "x"), "--pairs", "24"]) != 0
    assert "already distilled" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--out", str(tmp_path / "y"), "--lr", "5"]) != 0
    assert "lr must be between" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--out", str(teacher)]) != 0
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sfumato_samples_a_distilled_folder_with_its_own_settings(fast):
    import numpy as np
    from diffusers import LatentConsistencyModelPipeline

    import sfumato

    pipe = sfumato.load(fast)
    s = pipe.settings("a red circle", seed=3)
    assert (s.scheduler, s.steps) == ("LCM", FAST_STEPS)
    a = pipe.generate(s)[0]
    assert np.array_equal(np.asarray(a), np.asarray(pipe.generate(s)[0]))  # a seed reproduces the image
    assert "Sampler: LCM" in a.info["parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LatentConsistencyModelPipeline.from_pretrained(fast, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    b = ref("a red circle", num_inference_steps=s.steps, guidance_scale=s.guidance,
            generator=torch.Generator().manual_seed(3)).images[0]
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 2  # the same image as plain diffusers draws from the same seed
    with pytest.raises(UsageError, match="--scheduler LCM or TCD only"):
        pipe.generate(pipe.settings("a red circle", scheduler="DPM++ 2M"))


def test_tcd_samples_the_distilled_unet_as_plain_diffusers_does(fast):
    import numpy as np
    from diffusers import StableDiffusionPipeline, TCDScheduler

    import sfumato

    pipe = sfumato.load(fast)
    s = pipe.settings("a red circle", seed=5, scheduler="TCD")
    assert (s.scheduler, s.steps) == ("TCD", FAST_STEPS)  # a few-step sampler takes the few-step defaults
    a = pipe.generate(s)[0]
    assert "Sampler: TCD" in a.info["parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionPipeline.from_pretrained(fast, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = TCDScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    # TCD draws fresh noise each step: one generator per image, as sfumato seeds image i with seed + i
    b = ref("a red circle", num_inference_steps=s.steps, guidance_scale=s.guidance, eta=0.3,
            generator=[torch.Generator().manual_seed(5)]).images[0]
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 2
    lcm = pipe.generate(pipe.settings("a red circle", seed=5))[0]
    assert not np.array_equal(np.asarray(a), np.asarray(lcm))


def test_generate_cli_takes_the_folder_defaults(fast, tmp_path):
    from PIL import Image

    assert main(["generate", "a red circle", "--model", str(fast), "--out", str(tmp_path / "a.png")]) == 0
    params = Image.open(tmp_path / "a.png").info["parameters"]
    assert f"Steps: {FAST_STEPS}" in params and "Sampler: LCM" in params
    assert main(["generate", "a red circle", "--model", str(fast), "--steps", "2", "--out",
                 str(tmp_path / "b.png")]) == 0
    assert "Steps: 2" in Image.open(tmp_path / "b.png").info["parameters"]


def test_word_maps_of_a_distilled_model(fast):
    import sfumato

    pipe = sfumato.load(fast)
    images, maps = pipe.generate(pipe.settings("a red circle", seed=1), n=2, capture=True)
    assert len(images) == 2 and maps.shape[0] == 2 and float(maps.abs().sum()) > 0


def test_lcm_is_refused_for_a_model_that_is_not_distilled(teacher):
    import sfumato

    pipe = sfumato.load(teacher)
    with pytest.raises(UsageError, match="distilled few-step models only"):
        pipe.generate(pipe.settings("a red circle", scheduler="LCM"))


@pytest.fixture(scope="module")
def carrying(teacher, tmp_path_factory):
    """A copy of the teacher that carries its distilled UNet (`distill --attach`)."""
    import shutil

    model = tmp_path_factory.mktemp("attach") / "model"
    shutil.copytree(teacher, model)
    distill(model, None, DistillCfg(**QUICK), attach=True, progress=False)
    return model


def test_attach_writes_the_fast_unet_into_the_model(carrying, teacher):
    from sfumato.pipeline import FAST_UNET

    card = json.loads((carrying / "sfumato.json").read_text())
    assert (carrying / FAST_UNET / "diffusion_pytorch_model.safetensors").is_file()
    assert card["generation"] == {"scheduler": "LCM", "steps": FAST_STEPS, "guidance": 4.0}
    assert card["full_generation"]["scheduler"] != "LCM" and card["distilled"]["unet"] == FAST_UNET
    assert sorted(p.name for p in carrying.iterdir() if p.name.endswith(".partial")) == []
    # the model's own UNet is untouched
    assert (carrying / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (teacher / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_carrying_model_samples_few_steps_by_default_and_keeps_its_samplers(carrying, teacher):
    import numpy as np

    import sfumato

    pipe = sfumato.load(carrying)
    s = pipe.settings("a red circle", seed=2)
    assert (s.scheduler, s.steps, pipe.distilled) == ("LCM", FAST_STEPS, False)
    fast_img = pipe.generate(s)[0]
    assert "Sampler: LCM" in fast_img.info["parameters"]
    # another sampler takes the model's full defaults and its own UNet: the teacher's very image
    full = pipe.settings("a red circle", seed=2, scheduler="DPM++ 2M")
    assert (full.steps, full.guidance) != (FAST_STEPS, None) and full.steps == 20
    ref_pipe = sfumato.load(teacher)
    ref = ref_pipe.generate(ref_pipe.settings("a red circle", seed=2, scheduler="DPM++ 2M"))[0]
    assert np.array_equal(np.asarray(pipe.generate(full)[0]), np.asarray(ref))
    # and the few-step path is the distilled UNet's, not the teacher's
    assert not np.array_equal(np.asarray(fast_img), np.asarray(ref))


def sample_carried_unet_in_plain_diffusers(folder):
    """One 4-step LCM image (numpy) from a folder's carried few-step UNet, loaded by plain diffusers."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from sfumato.pipeline import FAST_UNET

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = UNet2DConditionModel.from_pretrained(folder, subfolder=FAST_UNET)
        lcm = StableDiffusionPipeline.from_pretrained(
            folder, unet=fast, safety_checker=None,
            scheduler=LCMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="trailing"))
    lcm.set_progress_bar_config(disable=True)
    return lcm("a red circle", num_inference_steps=4, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images


def test_a_carrying_model_still_loads_in_plain_diffusers(carrying):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = StableDiffusionPipeline.from_pretrained(carrying, safety_checker=None)
    assert sd.unet.config.time_cond_proj_dim is None  # the full model
    img = sample_carried_unet_in_plain_diffusers(carrying)
    assert img.shape == (1, 32, 32, 3) and img.std() > 0


def test_attach_refusals(carrying, teacher, tmp_path, capsys):
    assert main(["distill", str(carrying), "--attach", "--pairs", "24"]) != 0
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--attach", "--out", str(tmp_path / "x")]) != 0
    assert "either --out" in capsys.readouterr().err
    assert main(["distill", str(teacher)]) != 0
    assert "either --out" in capsys.readouterr().err


def test_a_carried_unet_that_does_not_fit_is_refused(carrying, teacher, tmp_path):
    import shutil

    import sfumato
    from sfumato.pipeline import FAST_UNET

    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    shutil.rmtree(model / FAST_UNET)
    shutil.copytree(teacher / "unet", model / FAST_UNET)  # undistilled: no guidance input
    with pytest.raises(UsageError, match="must hold a distilled UNet"):
        sfumato.load(model)


def test_a_carried_unet_of_an_older_teacher_is_called_stale(carrying, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    import sfumato

    model = tmp_path / "model"
    shutil.copytree(carrying, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sfumato.load(model)  # distilled from this very unet/: nothing to say
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights["conv_out.bias"] += 0.1  # the teacher was trained on afterwards
    save_file(weights, str(path))
    with pytest.warns(UserWarning, match="distilled from another unet/.*--attach --overwrite"):
        sfumato.load(model)
