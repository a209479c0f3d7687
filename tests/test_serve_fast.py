"""The server on a model that carries a few-step UNet: requests without sampler settings get the
model's own (LCM, few steps); a named sampler gets the full path with its own defaults."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from test_generate import build_tiny_sd  # noqa: E402
from test_serve import wait_job, wait_ready  # noqa: E402

from sfumato.distill import FAST_STEPS, DistillCfg, distill  # noqa: E402
from sfumato.server import create_app, model_loader  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-fast")
    model = build_tiny_sd(root / "teacher")
    shutil.copytree(model, root / "model")
    distill(root / "model", None, DistillCfg(steps=2, batch_size=2, pairs=24, checkpoint_every=2), attach=True,
            progress=False)
    models = model_loader(root / "model", [])()
    with TestClient(create_app(lambda: models)) as c:
        wait_ready(c)
        yield c


def parameters(c, body: dict) -> str:
    r = c.post("/v1/generate", json={"prompt": "a red circle", **body})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "done", job
    return job["images"][0]["parameters"]


def test_models_lists_both_paths(client):
    [m] = client.get("/v1/models").json()
    assert m["defaults"] == {"steps": FAST_STEPS, "guidance": 4.0, "scheduler": "LCM"}
    assert m["full_defaults"]["scheduler"] == "DPM++ 2M" and m["full_defaults"]["steps"] == 20
    assert "LCM" in m["samplers"] and "Euler a" in m["samplers"] and m["native"] == 32
    assert m["few_step_samplers"] == ["LCM", "TCD"]


def test_a_request_without_sampler_settings_takes_the_few_step_path(client):
    text = parameters(client, {"seed": 1})
    assert f"Steps: {FAST_STEPS}" in text and "Sampler: LCM" in text


def test_a_named_sampler_takes_the_full_path_and_its_defaults(client):
    text = parameters(client, {"seed": 1, "scheduler": "Euler"})
    assert "Steps: 20" in text and "Sampler: Euler" in text
    text = parameters(client, {"seed": 1, "scheduler": "LCM", "steps": 3})
    assert "Steps: 3" in text and "Sampler: LCM" in text


def test_a1111_requests_take_the_model_defaults_for_what_they_leave_out(client):
    import json

    def info(body):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, **body})
        assert r.status_code == 200, r.text
        return json.loads(r.json()["info"])

    got = info({})
    assert (got["sampler_name"], got["steps"], got["cfg_scale"]) == ("LCM", FAST_STEPS, 4.0)
    got = info({"sampler_name": "Euler a"})  # what webuiapi sends: the full path, its own steps
    assert (got["sampler_name"], got["steps"]) == ("Euler a", 20)
    got = info({"sampler_name": "Euler a", "steps": 5, "cfg_scale": 7})
    assert (got["steps"], got["cfg_scale"]) == (5, 7)
