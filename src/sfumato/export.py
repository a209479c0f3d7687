"""The lean CPU path: a model's UNets and VAE decoder as ONNX graphs, run by ONNX Runtime.

    sfumato export MODEL        # MODEL/onnx/: unet.onnx, unet_lcm.onnx, vae_decoder.onnx, manifest.json

A 64-px model's UNet is a couple of million parameters: in PyTorch most of a sampler step is the
per-module overhead of some six hundred small operations, which ONNX Runtime does not have
(docs/speed.md). Only the modules are swapped: sfumato's own sampling loop (schedulers, callbacks,
masks) runs unchanged around them, which is why the graphs are exported here with torch.onnx rather
than through a pipeline exporter such as optimum's, whose ORT pipelines replace the loop.

Each graph is checked against PyTorch when it is made (the largest difference is stored in the
manifest; beyond TOLERANCE nothing is written) and tied to the sha256 of the weights it was made from
and of its own file: `load` uses a graph only while both still match, and otherwise warns once and
samples with PyTorch (`sfumato export MODEL` rebuilds it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import SfumatoError, UsageError
from .files import file_sha256, publish_dir

FOLDER = "onnx"
FORMAT = "sfumato-onnx/1"
TOLERANCE = 1e-3  # largest absolute difference from PyTorch accepted at export (seen: ~1e-5)
OPSET = 17


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=timestep_cond).sample


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def _parts(pipe) -> dict[str, tuple[str, torch.nn.Module]]:
    """Graph name -> (weights file it is made from, module)."""
    from .pipeline import FAST_UNET

    parts = {}
    if pipe.full_unet is not None:
        parts["unet"] = ("unet", pipe.full_unet)
    if pipe.fast_unet is not None:
        parts[FAST_UNET] = ("unet" if pipe.distilled else FAST_UNET, pipe.fast_unet)
    parts["vae_decoder"] = ("vae", pipe.vae)
    return parts


def _weights(folder: Path, sub: str) -> Path:
    return next(iter(sorted((folder / sub).glob("*.safetensors"))))


def _example(name: str, module, pipe) -> dict[str, torch.Tensor]:
    """Inputs for tracing and checking: batch 2, the native latent size, one context of text states."""
    g = torch.Generator().manual_seed(0)
    side = pipe.native // pipe.factor
    if name == "vae_decoder":
        return {"latents": torch.randn(2, module.config.latent_channels, side, side, generator=g)}
    c = module.config
    x = {"sample": torch.randn(2, c.in_channels, side, side, generator=g), "timestep": torch.tensor([999, 400]),
         "encoder_hidden_states": torch.randn(2, pipe.tokenizer.model_max_length, c.cross_attention_dim, generator=g)}
    if c.time_cond_proj_dim is not None:
        x["timestep_cond"] = torch.randn(2, c.time_cond_proj_dim, generator=g)
    return x


DYNAMIC = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
           "encoder_hidden_states": {0: "batch", 1: "tokens"}, "timestep_cond": {0: "batch"},
           "latents": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "height", 3: "width"}}


def export(model: str | Path, graphs: list[str] | None = None, progress: bool = True) -> Path:
    """Write MODEL/onnx (replacing an old export whole) with the named graphs (default: every one the
    model has: unet, unet_lcm, vae_decoder) and return it."""
    from .cli.console import out as console_out
    from .pipeline import load

    folder = Path(model)
    import importlib.util

    for name in ("onnx", "onnxruntime"):  # torch.onnx writes the graph through onnx
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"sfumato export needs {name}: pip install 'sfumato[export]'")
    pipe = load(folder, device="cpu", onnx=False)
    parts = _parts(pipe)
    unknown = sorted(set(graphs or ()) - set(parts))
    if unknown:
        raise UsageError(f"{folder} has no {', '.join(unknown)} to export; it has {', '.join(parts)}")
    parts = {k: v for k, v in parts.items() if not graphs or k in graphs}
    work = Path(tempfile.mkdtemp(prefix=".onnx-", dir=folder))
    try:
        manifest = {"format": FORMAT, "torch": torch.__version__, "opset": OPSET, "graphs": {}}
        for name, (sub, module) in parts.items():
            inputs = _example(name, module, pipe)
            wrapper = (_DecoderGraph if name == "vae_decoder" else _UNetGraph)(module).eval()
            path = work / f"{name}.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # The TorchScript exporter: 4 s on the default UNet, against 80 s for the dynamo one (which
                # also guards the batch to 63), for a graph that runs as fast.
                torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=list(inputs),
                                  output_names=["out"], opset_version=OPSET, dynamo=False,
                                  dynamic_axes={k: DYNAMIC[k] for k in (*inputs, "out")})
                expected = wrapper(*inputs.values()).numpy()
            got = _session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            diff = float(abs(got - expected).max())
            if not diff <= TOLERANCE:
                raise SfumatoError(f"the ONNX graph of {name} differs from PyTorch by {diff:.2g} (limit "
                                   f"{TOLERANCE:g}); nothing was written")
            manifest["graphs"][name] = {"file": path.name, "sha256": file_sha256(path),
                                        "weights": str(_weights(folder, sub).relative_to(folder)),
                                        "weights_sha256": file_sha256(_weights(folder, sub)),
                                        "max_abs_diff": diff, "inputs": list(inputs)}
            if progress:
                console_out.print(f"{name}: {path.stat().st_size / 1e6:.1f} MB, max difference from PyTorch {diff:.1e}")
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_dir(work, folder / FOLDER)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder / FOLDER


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())  # the threads torch was given
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Idle ORT threads must not spin: torch's own threads run between the graphs (scheduler steps,
    # text tower), and with both spinning two threads drew an image slower than one (70 against 58 ms).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class GraphUNet:
    """An exported UNet called as the diffusers module is (what sampling.denoise needs of it)."""

    def __init__(self, session, module):
        self.session, self.config, self.dtype, self.device = session, module.config, module.dtype, module.device
        self.inputs = [i.name for i in session.get_inputs()]

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        t = torch.as_tensor(timestep).reshape(-1).expand(len(sample)).to(torch.int64)
        feed = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states,
                "timestep_cond": timestep_cond}
        out = self.session.run(None, {k: feed[k].contiguous().numpy() for k in self.inputs})[0]
        return SimpleNamespace(sample=torch.from_numpy(out))


class GraphDecoder:
    """An exported VAE decoder called as AutoencoderKL.decode is."""

    def __init__(self, session, vae):
        self.session, self.config = session, vae.config

    def decode(self, latents):
        out = self.session.run(None, {"latents": latents.contiguous().numpy()})[0]
        return SimpleNamespace(sample=torch.from_numpy(out))


def graphs_for(pipe, required: bool = False) -> dict[str, object]:
    """The usable graphs of pipe's folder by name ("unet", "unet_lcm", "vae_decoder"); none where the
    folder has no export, onnxruntime is missing or the export no longer matches the weights
    (a warning says which and how to rebuild; with `required` that is an error instead)."""
    root = pipe.folder / FOLDER if pipe.folder else None
    if root is None or not (root / "manifest.json").is_file():
        if required:
            raise UsageError(f"{pipe.folder} has no ONNX export; make one with `sfumato export {pipe.folder}`")
        return {}
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return _refuse(required, "onnxruntime is not installed (pip install onnxruntime)", pipe.folder)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        listed = manifest["graphs"] if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, dict):
        return _refuse(required, f"{root / 'manifest.json'} is not an export manifest", pipe.folder)
    graphs = {}
    for name, (sub, module) in _parts(pipe).items():
        entry = listed.get(name)
        if entry is None:
            continue
        path = root / str(entry.get("file", ""))
        try:
            if file_sha256(_weights(pipe.folder, sub)) != entry.get("weights_sha256"):
                return _refuse(required, f"its {name} graph was made from other {sub}/ weights (stale)", pipe.folder)
            if not path.is_file() or file_sha256(path) != entry.get("sha256"):
                return _refuse(required, f"{path.name} is missing or changed since export (corrupt)", pipe.folder)
            session = _session(path)
        except (OSError, StopIteration, RuntimeError) as e:
            return _refuse(required, f"{path.name} does not load ({str(e).splitlines()[0][:120]})", pipe.folder)
        graphs[name] = GraphDecoder(session, module) if name == "vae_decoder" else GraphUNet(session, module)
    return graphs


def _refuse(required: bool, why: str, folder: Path) -> dict:
    message = f"the ONNX export of {folder} is not used: {why}; rebuild it with `sfumato export {folder}`"
    if required:
        raise UsageError(message)
    warnings.warn(message + " (sampling with PyTorch meanwhile)", stacklevel=3)
    return {}


__all__ = ["export", "graphs_for", "GraphUNet", "GraphDecoder", "TOLERANCE"]
