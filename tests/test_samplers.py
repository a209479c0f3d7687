"""Every sampler sfumato lists runs on every kind of model it loads, and lands where it should.

Three tiny random-weight folders stand for the models users bring: a sfumato-trained one (v-prediction
on a zero-terminal-SNR cosine schedule, as `sfumato train` writes), a Stable Diffusion 1.x epsilon one
and a v-prediction (SD 2.x-style) one. An exact denoiser of a one-point data set then checks each
sampler's mapping onto diffusers: whatever the schedule, it must come out at that point.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sfumato
from sfumato.config import GenerationSettings as S
from sfumato.pipeline import DISTILLED_ONLY, SCHEDULERS, make_scheduler

NAMES = [n for n in SCHEDULERS if n not in DISTILLED_ONLY]  # test_distill.py covers LCM
from sfumato.sampling import denoise, seeded_noise
from test_generate import build_tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KINDS = ("sfumato", "sd-epsilon", "sd-v")


def sfumato_scheduler_config() -> dict:
    """The sampler config `sfumato train` saves (zero-terminal-SNR v-prediction, cosine betas)."""
    from sfumato.config import get_preset
    from sfumato.models import build_sample_scheduler, build_train_scheduler

    cfg = dict(build_sample_scheduler(build_train_scheduler(get_preset("tiny"))).config)
    assert cfg["rescale_betas_zero_snr"] and cfg["prediction_type"] == "v_prediction"
    return cfg


def sd_scheduler_config(prediction_type: str) -> dict:
    """Stable Diffusion's scheduler_config.json: 1.5 (epsilon) or 2.x (v-prediction)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True, "clip_sample": False,
            "prediction_type": prediction_type}


def scheduler_config(kind: str) -> dict:
    return {"sfumato": sfumato_scheduler_config, "sd-epsilon": lambda: sd_scheduler_config("epsilon"),
            "sd-v": lambda: sd_scheduler_config("v_prediction")}[kind]()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("samplers")
    base = build_tiny_sd(root / "base")
    out = {}
    for kind in KINDS:
        folder = root / kind
        shutil.copytree(base, folder)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(kind)))
        out[kind] = sfumato.load(folder, device="cpu")
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_runs_all_its_steps_on_every_model(pipes, kind, name):
    pipe = pipes[kind]
    for steps in (2, 20):
        seen = []
        img = pipe.generate(S("a red circle", steps=steps, scheduler=name), callback=seen.append)[0]
        assert seen and seen[-1]["total"] == len(seen) and len(seen) >= steps, (steps, len(seen))
        assert all(torch.isfinite(s["latents"]).all() for s in seen)
        assert np.asarray(img).std() > 0 and f"Sampler: {name}," in img.info["parameters"]


# ---------------------------------------------------------------- an exact denoiser


class PointDenoiser:
    """The exact denoiser when all data is one latent `x0`: at noise level t it predicts the eps or v
    that leads back to x0. Timesteps between training steps get the sigma diffusers interpolates."""

    def __init__(self, config: dict, x0: torch.Tensor):
        from diffusers import DDPMScheduler

        ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt().numpy()
        self.v = config.get("prediction_type") == "v_prediction"
        self.x0 = x0

    def __call__(self, x, t, encoder_hidden_states=None):
        s = float(np.interp(float(t), np.arange(len(self.sigmas)), self.sigmas))
        a = 0.0 if not np.isfinite(s) else 1 / (1 + s * s)
        eps = (x.double() - a ** 0.5 * self.x0) / (1 - a) ** 0.5
        out = a ** 0.5 * eps - (1 - a) ** 0.5 * self.x0 if self.v else eps
        return SimpleNamespace(sample=out.float())


def zero_snr_scaled_linear() -> dict:
    """A zero-terminal-SNR fine-tune of SD 2.x: the option on a schedule that is not cosine."""
    return {**sd_scheduler_config("v_prediction"), "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("kind", KINDS + ("zero-snr-scaled-linear",))
@pytest.mark.parametrize("name", NAMES)
def test_sampler_mapping_lands_on_the_data(kind, name):
    cfg = zero_snr_scaled_linear() if kind == "zero-snr-scaled-linear" else scheduler_config(kind)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    x0 = torch.full((1, 4, 4, 4), 0.7, dtype=torch.float64)
    x0[:, 1] = -0.4
    unet = PointDenoiser(cfg, x0)
    cond = torch.zeros(1, 2, 8)
    for steps in (2, 3, 7, 20, 50):
        noise, gens = seeded_noise((4, 4, 4), 1, 0)
        z = denoise(unet, make_scheduler(name, cfg), cond, cond, noise, steps, 1.0, generator=gens)
        err = (z.double() - x0).abs()
        if name == "DDIM":
            # DDIM's last step may stop at alpha-bar[0] rather than 1 (Stable Diffusion's
            # set_alpha_to_one=False, as in A1111; or a step count that does not divide 1000), which
            # leaves sqrt(1 - alpha-bar[0]) of noise: 0.03 on Stable Diffusion's schedule.
            assert err.mean() < 0.04, (steps, float(err.mean()))
        else:
            assert err.max() < 0.01, (steps, float(err.max()))


def test_karras_on_zero_terminal_snr_uses_every_step():
    """The reported crash: DPM++ 2M Karras on sfumato's schedule repeats integer timesteps."""
    cfg = sfumato_scheduler_config()
    sched = make_scheduler("DPM++ 2M Karras", cfg)
    sched.set_timesteps(20)
    assert len(set(sched.timesteps.tolist())) < 20  # the schedule really does repeat timesteps
    calls = []

    class Counting(PointDenoiser):
        def __call__(self, x, t, encoder_hidden_states=None):
            calls.append(int(t))
            return super().__call__(x, t)

    x0 = torch.zeros(1, 4, 4, 4, dtype=torch.float64)
    noise, gens = seeded_noise((4, 4, 4), 1, 0)
    denoise(Counting(cfg, x0), make_scheduler("DPM++ 2M Karras", cfg), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8),
            noise, 20, 1.0, generator=gens)
    assert len(calls) == 20


def test_schedulers_without_zero_snr_get_the_models_betas():
    """LMS and Heun have no rescale_betas_zero_snr option: they are handed the model's own betas, with
    the infinite last sigma clamped as diffusers' Euler does."""
    from diffusers import EulerDiscreteScheduler

    cfg = zero_snr_scaled_linear()
    euler = EulerDiscreteScheduler.from_config(cfg)
    for name in ("LMS", "Heun"):
        s = make_scheduler(name, cfg)
        assert torch.allclose(s.alphas_cumprod.double(), euler.alphas_cumprod.double(), rtol=1e-4, atol=1e-9), name
        s.set_timesteps(10)
        assert torch.isfinite(s.sigmas).all() and s.sigmas.max() > 1000, name
