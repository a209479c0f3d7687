"""`sfumato export`: ONNX graphs of a model's UNets and VAE decoder, used only while they match."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from test_generate import build_tiny_sd

import sfumato
from sfumato.cli import main
from sfumato.distill import DistillCfg, distill
from sfumato.errors import UsageError
from sfumato.export import TOLERANCE, GraphDecoder, GraphUNet, export

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model that carries a distilled UNet, exported whole."""
    model = build_tiny_sd(tmp_path_factory.mktemp("export") / "model")
    distill(model, None, DistillCfg(steps=2, batch_size=2, pairs=24, checkpoint_every=2), attach=True, progress=False)
    assert main(["export", str(model)]) == 0
    return model


def fresh_copy(exported, tmp_path):
    shutil.copytree(exported, tmp_path / "m")
    return tmp_path / "m"


def test_export_writes_every_graph_checked_against_pytorch(exported):
    manifest = json.loads((exported / "onnx" / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"unet", "unet_lcm", "vae_decoder"}
    for entry in manifest["graphs"].values():
        assert (exported / "onnx" / entry["file"]).is_file() and entry["max_abs_diff"] <= TOLERANCE
    assert not [p for p in exported.iterdir() if p.name.startswith(".onnx")]  # no work folder left behind


def test_the_graphs_stand_in_for_the_modules_on_both_samplers(exported):
    pipe = sfumato.load(exported)
    assert isinstance(pipe.graphs["unet"], GraphUNet) and isinstance(pipe.graphs["vae_decoder"], GraphDecoder)
    plain = sfumato.load(exported, onnx=False)
    assert plain.graphs == {}
    for scheduler in ("LCM", "DPM++ 2M"):
        s = pipe.settings("a red circle", seed=4, scheduler=scheduler)
        a = np.asarray(pipe.generate(s, n=2)[1]).astype(int)
        b = np.asarray(plain.generate(s, n=2)[1]).astype(int)
        assert np.abs(a - b).max() <= 2  # a seed draws the same image on both paths
        assert np.array_equal(a, np.asarray(pipe.generate(s, n=2)[1]))  # and again on the same one


def test_the_graph_is_what_runs(exported, monkeypatch):
    pipe = sfumato.load(exported)
    calls = []
    real = GraphUNet.__call__
    monkeypatch.setattr(GraphUNet, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    pipe.generate(pipe.settings("a red circle", steps=3))
    assert len(calls) == 3
    calls.clear()  # other sizes and attention capture take the PyTorch modules
    pipe.generate(pipe.settings("a red circle", steps=3, width=64, height=64))
    pipe.generate(pipe.settings("a red circle", steps=3), capture=True)
    assert calls == []


def test_a_stale_export_is_not_used(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    model = fresh_copy(exported, tmp_path)
    path = model / "unet_lcm" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights["conv_out.bias"] = weights["conv_out.bias"] + 0.1  # distilled again after the export
    save_file(weights, str(path))
    with pytest.warns(UserWarning, match="other unet_lcm/ weights .stale.*sfumato export"):
        pipe = sfumato.load(model)
    assert pipe.graphs == {}
    with pytest.raises(UsageError, match="stale"):
        sfumato.load(model, onnx=True)
    assert main(["export", str(model)]) == 0  # rebuilt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(sfumato.load(model).graphs) == {"unet", "unet_lcm", "vae_decoder"}


def test_a_corrupt_export_is_not_used(exported, tmp_path):
    model = fresh_copy(exported, tmp_path)
    graph = model / "onnx" / "vae_decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.warns(UserWarning, match="vae_decoder.onnx is missing or changed"):
        assert sfumato.load(model).graphs == {}
    (model / "onnx" / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="not an export manifest"):
        assert sfumato.load(model).graphs == {}


def test_onnx_required_without_an_export(tmp_path):
    model = build_tiny_sd(tmp_path / "plain")
    assert sfumato.load(model).graphs == {}
    with pytest.raises(UsageError, match="has no ONNX export; make one with `sfumato export"):
        sfumato.load(model, onnx=True)


def test_a_failed_check_writes_nothing(exported, tmp_path, monkeypatch):
    import sfumato.export as ex

    model = fresh_copy(exported, tmp_path)
    before = (model / "onnx" / "manifest.json").read_text()
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # no graph can pass
    with pytest.raises(sfumato.SfumatoError, match="differs from PyTorch"):
        export(model, progress=False)
    assert (model / "onnx" / "manifest.json").read_text() == before
    assert not [p for p in model.iterdir() if p.name.startswith(".onnx")]


def test_graph_unet_takes_what_the_module_takes(exported):
    pipe = sfumato.load(exported)
    unet, graph = pipe.fast_unet, pipe.graphs["unet_lcm"]
    x, ctx = torch.randn(3, 4, 16, 16), torch.randn(3, 24, 32)  # another batch, a longer (chunked) prompt
    w = torch.randn(3, unet.config.time_cond_proj_dim)
    with torch.no_grad():
        ref = unet(x, torch.tensor(500), encoder_hidden_states=ctx, timestep_cond=w).sample
    got = graph(x, torch.tensor(500), encoder_hidden_states=ctx, timestep_cond=w).sample
    assert torch.allclose(ref, got, atol=1e-4)


def test_some_graphs_only(exported, tmp_path, capsys):
    model = fresh_copy(exported, tmp_path)
    assert main(["export", str(model), "--graphs", "unet_lcm,vae_decoder"]) == 0
    pipe = sfumato.load(model)
    assert set(pipe.graphs) == {"unet_lcm", "vae_decoder"}
    s = pipe.settings("a red circle", seed=1, scheduler="DPM++ 2M")  # its UNet runs in PyTorch
    assert pipe.generate(s)[0].size == (32, 32)
    assert main(["export", str(model), "--graphs", "unet_xl"]) != 0
    assert "has no unet_xl to export" in capsys.readouterr().err
