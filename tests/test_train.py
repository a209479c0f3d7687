"""`sfumato train`: end to end on the tiny preset, falling losses, resume after SIGKILL, two-process
accelerate, and refusals of bad input.

One tiny run (all four stages, ~1 min on one thread) is shared by the end-to-end and loss tests;
the other runs shrink steps and data with --set, since they only exercise the mechanics.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.cli import main
from sfumato.config import DataCfg, from_dict, get_preset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler", "clip")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines() if line]


def _loss_rows(rows, stage):
    return [r for r in rows if r.get("stage") == stage and "loss" in r]


def _load_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)


def _generate(folder: Path) -> np.ndarray:
    import torch

    pipe = _load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


# ---------------------------------------------------------------- one shared tiny run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    code = main(["train", "--data", "shapesworld", "--out", str(out), "--preset", "tiny"])
    return code, out


def test_end_to_end_tiny_layout(tiny_model):
    code, out = tiny_model
    assert code == 0
    assert out.is_dir()
    assert not out.with_name(out.name + ".partial").exists()
    assert (out / "model_index.json").is_file() and (out / "sfumato.json").is_file()
    for c in COMPONENTS:
        assert (out / c).is_dir(), c
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert (out / "logs" / "metrics.jsonl").is_file()
    assert not (out / "checkpoints").exists() and not (out / "run.json").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    for c in ("text_encoder", "vae", "unet", "clip"):
        assert list((out / c).glob("*.safetensors")), f"{c} has no safetensors weights"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_end_to_end_tiny_sample_grids(tiny_model):
    """The UNet stage's evaluations draw the sample prompts (through Pipeline.generate) with the EMA and
    the raw weights: a grid each in logs/ and the scene checker's pass rate in the metrics."""
    code, out = tiny_model
    assert code == 0
    for name in ("ema", "raw"):
        grids = sorted((out / "logs").glob(f"samples-*-{name}.png"))
        assert grids, name
        evals = [r["eval"] for r in _rows(out) if r.get("stage") == "unet" and "eval" in r]
        rates = [e[f"samples_checker_pass_{name}"] for e in evals if f"samples_checker_pass_{name}" in e]
        assert rates and all(0.0 <= v <= 1.0 for v in rates), name


def test_end_to_end_tiny_pipeline_generates(tiny_model):
    code, out = tiny_model
    assert code == 0
    images = _generate(out)
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_end_to_end_tiny_clip_and_tokenizer_load(tiny_model):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    code, out = tiny_model
    assert code == 0
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    card = json.loads((out / "sfumato.json").read_text())
    assert len(tok) == card["metrics"]["tokenizer"]["vocab_size"]
    assert tok.model_max_length == 24
    ids = tok(["a red circle"], padding="max_length", max_length=24, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
    assert tok.unk_token_id not in ids[0, 1:4].tolist()  # every word is in the learned vocabulary
    clip = CLIPModel.from_pretrained(str(out / "clip")).eval()
    with torch.no_grad():
        txt = clip.get_text_features(input_ids=ids)
        img = clip.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    txt = getattr(txt, "pooler_output", txt)  # transformers v5 may return an output object
    img = getattr(img, "pooler_output", img)
    assert txt.shape == (1, 32) and img.shape == (1, 32)


def test_end_to_end_tiny_model_card(tiny_model):
    code, out = tiny_model
    assert code == 0
    card = json.loads((out / "sfumato.json").read_text())
    assert card["format"] == "sfumato-model/1"
    assert from_dict(card["config"]) == get_preset("tiny")
    data = card["data"]
    assert data["source"] == "shapesworld" and data["pairs"] == 600
    assert len(data["fingerprint"]) == 64 and int(data["fingerprint"], 16) >= 0
    for lib in ("sfumato", "torch", "diffusers", "transformers", "accelerate", "python"):
        assert card["versions"][lib], lib
    m = card["metrics"]
    assert set(m) == {"tokenizer", "clip", "vae", "unet"}
    for k in ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5"):
        assert 0.0 <= m["clip"][k] <= 1.0, k
    assert math.isfinite(m["vae"]["vae_psnr"]) and m["vae"]["vae_psnr"] > 0
    assert m["vae"]["scaling_factor"] > 0
    assert math.isfinite(m["unet"]["loss"])
    assert set(card["seconds"]) == {"tokenizer", "clip", "vae", "unet"}


@pytest.mark.parametrize("stage", [
    "clip",
    "vae",
    "unet",
])
def test_each_loss_falls(tiny_model, stage):
    code, out = tiny_model
    assert code == 0
    rows = _loss_rows(_rows(out), stage)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # each step logged once, in order
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first, f"{stage}: first {losses[:3]} last {losses[-3:]}"


# ---------------------------------------------------------------- resume after SIGKILL


def test_resume_after_sigkill(tmp_path, capsys):
    out = tmp_path / "model"
    work = tmp_path / "model.partial"
    args = [sys.executable, "-m", "sfumato", "train", "--data", "shapesworld", "--out", str(out), "--preset", "tiny",
            "--set", "data.shapes_n=200", "--set", "clip.steps=5", "--set", "vae.steps=5",
            "--set", "unet.steps=60", "--set", "checkpoint_every=10", "--set", "eval_every=1000"]
    latest = work / "checkpoints" / "unet" / "latest.json"
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not latest.exists():
            assert proc.poll() is None, f"training ended (rc {proc.returncode}) before a unet checkpoint: " \
                                        + (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no unet checkpoint within 180 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    # nothing looks complete
    assert not out.exists()
    assert work.is_dir()
    assert json.loads((work / "run.json").read_text())["done"] == ["tokenizer", "clip", "vae"]
    assert not (work / "unet").exists() and not (work / "model_index.json").exists()
    ckpt_step = json.loads(latest.read_text())["step"]
    assert 10 <= ckpt_step < 60 and ckpt_step % 10 == 0
    n_before = len(_rows(work))
    killed_unet = [r["step"] for r in _loss_rows(_rows(work), "unet")]
    assert killed_unet and max(killed_unet) >= ckpt_step

    # without --resume the unfinished run is refused, not clobbered
    capsys.readouterr()
    assert main(args[3:]) == 2
    assert "--resume" in capsys.readouterr().err
    assert len(_rows(work)) == n_before

    r = subprocess.run([*args, "--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert out.is_dir() and not work.exists()
    assert (out / "unet").is_dir() and not (out / "checkpoints").exists()
    rows = _rows(out)
    resumed = rows[n_before:]
    assert not [x for x in resumed if x.get("stage") in ("clip", "vae")]  # finished stages are not redone
    steps = [x["step"] for x in _loss_rows(resumed, "unet")]
    assert steps, "the resumed run logged no unet steps"
    assert steps[0] > ckpt_step and steps[0] == ckpt_step + 5  # continues right after the checkpoint
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert json.loads((out / "sfumato.json").read_text())["config"]["unet"]["steps"] == 60


# ---------------------------------------------------------------- accelerate, two processes


def test_accelerate_two_processes(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    assert accelerate.exists(), accelerate
    out = tmp_path / "model"
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sfumato", "train",
           "--data", "shapesworld", "--out", str(out), "--preset", "tiny", "--set", "data.shapes_n=120",
           "--set", "clip.steps=6", "--set", "vae.steps=6", "--set", "unet.steps=6", "--set", "eval_every=6"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert out.is_dir() and not (tmp_path / "model.partial").exists()
    for c in COMPONENTS:
        assert (out / c).is_dir(), c
    rows = _rows(out)
    for stage in ("clip", "vae", "unet"):  # only the main process logs: each step once
        steps = [x["step"] for x in _loss_rows(rows, stage)]
        assert steps == [5, 6], (stage, steps)
    assert _load_pipeline(out) is not None


@pytest.mark.parametrize("bidirectional", [False, True])
def test_text_encoder_trains_with_the_unet_when_given_a_learning_rate(tmp_path, bidirectional):
    """unet.text_encoder_lr > 0: the UNet's text tower learns along (clip/ keeps its own) and the
    folder still loads in plain diffusers; the engine gives the tower its own learning rate. With
    unet.text_bidirectional the tower is CLIP's text tower with the causal mask lifted."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "model"
    code = main(["train", "--data", "shapesworld", "--out", str(out), "--preset", "tiny", "--set", "data.shapes_n=120",
                 "--set", "clip.steps=6", "--set", "vae.steps=6", "--set", "unet.steps=8", "--set", "eval_every=8",
                 "--set", "unet.text_encoder_lr=0.01", "--set", f"unet.text_bidirectional={bidirectional}"])
    assert code == 0
    trained = load_file(str(out / "text_encoder" / "model.safetensors"))
    clip = load_file(str(out / "clip" / "model.safetensors"))
    name, clip_name = (("encoder.layer.0.attention.self.query.weight", "encoder.layers.0.self_attn.q_proj.weight")
                       if bidirectional else ("encoder.layers.0.self_attn.q_proj.weight",) * 2)
    assert not torch.equal(trained[name], clip[f"text_model.{clip_name}"])  # the tower moved away from CLIP's
    tower = json.loads((out / "model_index.json").read_text())["text_encoder"][1]
    assert tower == ("MegatronBertModel" if bidirectional else "CLIPTextModel")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.text_encoder).__name__ == tower
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_engine_scales_the_learning_rate_by_parameter_name(tmp_path):
    from sfumato.engine import Engine, StageSpec

    model = torch.nn.ModuleDict({"unet": torch.nn.Linear(4, 4), "text_encoder": torch.nn.Linear(4, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = StageSpec("s", model, lambda m, g: ((m["unet"](m["text_encoder"](torch.ones(2, 4)))).pow(2).mean(), {}),
                     steps=3, lr=0.1, warmup=0, batch_size=2, lr_scales={"text_encoder.": 0.0})
    Engine(tmp_path, seed=0, progress=False).run(spec)
    after = model.state_dict()
    assert not torch.equal(after["unet.weight"], before["unet.weight"])
    assert torch.equal(after["text_encoder.weight"], before["text_encoder.weight"])  # scale 0: frozen


# ---------------------------------------------------------------- bad input


COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def _make_pairs(folder: Path, n: int = 12, sizes=((32, 32),), long_every: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        w, h = sizes[i % len(sizes)]
        img = Image.new("RGB", (w, h), (255, 255, 255))
        img.paste(COLORS[color], (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        img.save(folder / f"img{i:03d}.png")
        caption = f"a {color} square number {i}"
        if long_every and i % long_every == 0:
            caption += " " + " ".join(f"with {c} dots and {names[(j + 1) % 4]} stripes"
                                      for j, c in enumerate(names * 2))
        (folder / f"img{i:03d}.txt").write_text(caption)
    return folder


def _train(*args) -> int:
    return main(["train", "--preset", "tiny", *map(str, args)])


def test_empty_data_folder_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "model"
    assert _train("--data", empty, "--out", out) == 2
    err = capsys.readouterr().err
    assert "no usable image-caption pairs" in err and "Traceback" not in err
    assert not out.exists()


def test_empty_data_folder_leaves_no_partial_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "model"
    assert _train("--data", empty, "--out", out) == 2
    assert not (tmp_path / "model.partial").exists()
    _make_pairs(empty, 4)
    capsys.readouterr()
    assert _train("--data", empty, "--out", out, "--stages", "tokenizer") == 0, capsys.readouterr().err


def test_existing_output_without_overwrite_exit_2(tmp_path, capsys):
    data = _make_pairs(tmp_path / "pairs", 4)
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _train("--data", data, "--out", out, "--stages", "tokenizer") == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "model.partial").exists()


def test_resume_with_nothing_to_resume_exit_2(tmp_path, capsys):
    data = _make_pairs(tmp_path / "pairs", 4)
    out = tmp_path / "model"
    assert _train("--data", data, "--out", out, "--resume", "--stages", "tokenizer") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_unknown_stage_exit_2(tmp_path, capsys):
    out = tmp_path / "model"
    assert _train("--data", "shapesworld", "--out", out, "--stages", "tokenizer,paint") == 2
    err = capsys.readouterr().err
    assert "paint" in err and "unet" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_refused_after_data_changed_unless_force(tmp_path, capsys):
    data = _make_pairs(tmp_path / "pairs", 12)
    out = tmp_path / "model"
    work = tmp_path / "model.partial"
    assert _train("--data", data, "--out", out, "--stages", "tokenizer") == 0
    state = json.loads((work / "run.json").read_text())
    assert state["done"] == ["tokenizer"] and state["data"]["pairs"] == 12
    assert not out.exists()  # stages remain, so nothing looks complete
    fingerprint = state["data"]["fingerprint"]

    (data / "img005.txt").write_text("a purple circle that was not here before")
    capsys.readouterr()
    resume = ["--data", data, "--out", out, "--resume", "--stages", "tokenizer,clip", "--set", "clip.steps=2"]
    assert _train(*resume) == 2
    err = capsys.readouterr().err
    assert "changed" in err and "--force" in err and str(data) in err
    state = json.loads((work / "run.json").read_text())
    assert state["done"] == ["tokenizer"] and state["data"]["fingerprint"] == fingerprint
    assert not (work / "clip").exists()

    assert _train(*resume, "--force") == 0, capsys.readouterr().err
    state = json.loads((work / "run.json").read_text())
    assert state["done"] == ["tokenizer", "clip"]
    assert state["data"]["fingerprint"] != fingerprint
    assert (work / "clip").is_dir() and not out.exists()


def test_mixed_sizes_centre_cropped_and_long_captions_counted(tmp_path):
    sizes = ((32, 32), (96, 32), (40, 64), (64, 64))
    data = _make_pairs(tmp_path / "pairs", 12, sizes=sizes, long_every=4)
    # a wide image whose middle third is green: the centre crop keeps only the green
    wide = Image.new("RGB", (96, 32), COLORS["red"])
    wide.paste(COLORS["green"], (32, 0, 64, 32))
    wide.paste(COLORS["blue"], (64, 0, 96, 32))
    wide.save(data / "img001.png")
    out = tmp_path / "model"
    with pytest.warns(UserWarning, match=r"3 of 12 captions are longer than the context of 24 tokens"):
        assert _train("--data", data, "--out", out, "--stages", "tokenizer") == 0
    state = json.loads((tmp_path / "model.partial" / "run.json").read_text())
    assert state["data"]["pairs"] == 12 and state["data"]["skipped"] == 0
    assert state["data"]["sizes"] == 4 and state["data"]["resized"] == 3
    assert state["metrics"]["tokenizer"]["captions_truncated"] == 3

    from sfumato.data import load_pairs_data

    pd = load_pairs_data(str(data), DataCfg(res=32), progress=False)
    assert tuple(pd.images.shape) == (12, 3, 32, 32)
    crop = pd.images[pd.ids.index("img001")].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(crop - np.array(COLORS["green"])).max() <= 8


# ---------------------------------------------------------------- unet.init: start from saved weights


def test_unet_init_loads_the_same_architecture_and_refuses_another(tiny_model, tmp_path):
    import torch

    from sfumato.errors import UsageError
    from sfumato.models import build_unet
    from sfumato.stages import load_unet_weights

    code, out = tiny_model
    cfg = get_preset("tiny")
    unet = build_unet(cfg, cfg.data.res // 4, cfg.clip.text_width)
    load_unet_weights(unet, out / "unet")
    from safetensors.torch import load_file

    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    other = get_preset("tiny")
    other.unet.channels = tuple(2 * c for c in other.unet.channels)
    with pytest.raises(UsageError, match="another architecture"):
        load_unet_weights(build_unet(other, other.data.res // 4, other.clip.text_width), out / "unet")


def test_unet_init_missing_is_refused_before_anything_is_written(tmp_path, capsys):
    data = _make_pairs(tmp_path / "pairs", 4)
    out = tmp_path / "model"
    assert _train("--data", data, "--out", out, "--set", f"unet.init={tmp_path / 'nope'}") == 2
    assert "unet.init" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_one_pair_is_refused_before_training(tmp_path, capsys):
    data = _make_pairs(tmp_path / "pairs", 1)
    out = tmp_path / "model"
    t = time.time()
    assert _train("--data", data, "--out", out) == 2
    err = capsys.readouterr().err
    assert "held-out" in err and "at least 2 and 1" in err and "data.holdout" in err
    assert time.time() - t < 20 and not out.exists() and not (tmp_path / "model.partial").exists()


def test_sample_grids_of_own_data_show_its_held_out_captions():
    from types import SimpleNamespace

    import numpy as np

    from sfumato.config import get_preset
    from sfumato.stages import grid_prompts

    cfg = get_preset("tiny")
    own = SimpleNamespace(source="xrays/", captions=["a chest x-ray", "a knee", "a knee", "a hand"],
                          val_idx=np.array([1, 2, 3]))
    assert grid_prompts(cfg, own) == ["a knee", "a hand"]
    assert grid_prompts(cfg, SimpleNamespace(source="shapesworld", captions=[], val_idx=[])) == list(
        cfg.sample_prompts)
    cfg.sample_prompts = ("a lung",)
    assert grid_prompts(cfg, own) == ["a lung"]  # prompts the user gave win


def test_sample_prompts_file_is_checked_before_training(tmp_path, capsys):
    from sfumato.cli import main

    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n")
    assert main(["train", "--data", "shapesworld", "--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--sample-prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()
