"""Generation from a diffusers-layout Stable Diffusion folder: library, CLI, files and errors.

The model is a tiny SD-architecture folder built here (random weights, 32 px native), the way
diffusers' own tests build dummy components, so every test runs in well under a second on a CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.cli import main
from sfumato.errors import SfumatoError, UsageError
from sfumato.config import GenerationSettings as S
from sfumato.pipeline import DISTILLED_ONLY, SCHEDULERS, GenerationSettings, parse_parameters

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from diffusers' schedulers

NATIVE = 32
PROMPT = "a red circle"
LONG_PROMPT = ("a small red circle to the left of a large blue square on a white background "
               "and two green triangles above three yellow crosses")
# Schedulers whose step() draws fresh noise (ancestral / DDPM variance).



# ---------------------------------------------------------------- the tiny model


def shapes_captions(n: int = 50) -> list[str]:
    from sfumato.shapesworld import ShapesWorld

    world = ShapesWorld(n, seed=0)
    return [world.scene(i).caption for i in range(n)]


def build_tiny_sd(folder: Path, scheduler: str = "PNDM") -> Path:
    """Save a tiny random-weight Stable Diffusion 1.x-architecture folder (32 px native) to `folder`."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sfumato.models import quiet_libraries
    from sfumato.tokenizer import train_tokenizer

    quiet_libraries()
    folder = Path(folder)
    tok = train_tokenizer(shapes_captions(), vocab_size=400, context_length=16, out=folder.parent / f".{folder.name}-tok")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2)
    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                steps_offset=1)  # as Stable Diffusion 1.5's scheduler_config.json
    sched = PNDMScheduler(skip_prk_steps=True, **sd15) if scheduler == "PNDM" else DDIMScheduler(clip_sample=False, **sd15)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return sfumato.load(model_dir)


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    from sfumato.shapesworld import ShapesWorld

    return ShapesWorld(1, seed=0, res=NATIVE)[0][0]


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def same_up_to_rounding(a: Image.Image, b: Image.Image) -> bool:
    """Equal but for the odd 1-level rounding flip: torch's CPU kernels may sum in another order
    for another batch size, so bit-equality only holds between runs of the same batch."""
    d = np.abs(px(a) - px(b))
    return d.max() <= 2 and (d > 0).mean() < 0.01


def one_line(text: str) -> str:
    """The single line of `text`."""
    lines = text.strip("\n").splitlines()
    assert len(lines) == 1, text
    return lines[0]


def flat(text: str) -> str:
    """Text without any whitespace, so a check holds whether or not the console wrapped (or folded) it."""
    return "".join(text.split())


def cli(*args) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------- loading and sizes


def test_load_and_native_size(pipe, model_dir):
    assert pipe.native == NATIVE and pipe.name == "tiny-sd"
    images = pipe.generate(S(PROMPT, steps=3))
    assert len(images) == 1 and isinstance(images[0], Image.Image)
    assert images[0].size == (NATIVE, NATIVE) and images[0].mode == "RGB"
    assert px(images[0]).std() > 0  # not a blank frame


def test_explicit_sizes(pipe):
    assert pipe.generate(S(PROMPT, steps=2, width=64, height=64))[0].size == (64, 64)
    assert pipe.generate(S(PROMPT, steps=2, width=48, height=48))[0].size == (48, 48)
    assert pipe.generate(S(PROMPT, steps=2, width=64, height=32))[0].size == (64, 32)  # (width, height)


def test_pipeline_from_in_memory_components(pipe):
    from sfumato.pipeline import Pipeline

    mem = Pipeline(None, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler_config, pipe.device)
    settings = S(PROMPT, seed=4, steps=2)
    img = mem.generate(settings)[0]
    assert np.array_equal(px(img), px(pipe.generate(settings)[0]))
    assert "Model: in-memory" in img.info["parameters"] and settings.width == 0  # the settings are not modified


def test_load_via_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert cli("generate", PROMPT, "--model", model_dir, "--steps", 2, "--out", out) == 0
    with Image.open(out) as im:
        assert im.size == (NATIVE, NATIVE) and im.format == "PNG"
    assert main(["generate", PROMPT, "--model", str(model_dir), "--steps", "2", "--size", "64x32",
                 "--out", str(tmp_path / "wide.png")]) == 0
    with Image.open(tmp_path / "wide.png") as im:
        assert im.size == (64, 32)


def test_load_errors_are_sfumato_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        sfumato.load(tmp_path / "nope")
    import sfumato.pipeline as pl

    monkeypatch.setattr(pl, "DEFAULT_MODEL", tmp_path / "no-default")
    with pytest.raises(SfumatoError, match="default model is missing"):
        sfumato.load()


def test_the_shipped_default_model_draws_from_plain_diffusers_and_sfumato():
    from diffusers import StableDiffusionPipeline

    from sfumato.pipeline import DEFAULT_MODEL

    files = [f for f in DEFAULT_MODEL.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    sd = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False)
    assert sd.unet.config.sample_size * sd.vae_scale_factor == 64
    img = sfumato.load().generate(S("a red circle on a white background", seed=0, steps=4))[0]
    assert img.size == (64, 64) and "sfumato-default" in img.info["parameters"]
    rgb = px(img).reshape(-1, 3).astype(int)
    assert (rgb.min(1) > 200).mean() > 0.3  # mostly white, as asked: the weights are trained, not random


# ---------------------------------------------------------------- determinism


def test_same_seed_same_pixels_different_seed_different(pipe):
    a = pipe.generate(S(PROMPT, seed=11, steps=3))[0]
    torch.manual_seed(1234)  # the global RNG must not matter
    b = pipe.generate(S(PROMPT, seed=11, steps=3))[0]
    c = pipe.generate(S(PROMPT, seed=12, steps=3))[0]
    assert np.array_equal(px(a), px(b))
    assert not np.array_equal(px(a), px(c))


def test_batch_image_i_uses_seed_plus_i(pipe):
    batch = pipe.generate(S(PROMPT, seed=5, steps=3), n=3)
    assert len(batch) == 3
    for i, img in enumerate(batch):
        single = pipe.generate(S(PROMPT, seed=5 + i, steps=3), n=1)[0]
        assert same_up_to_rounding(img, single), f"image {i}"
        assert f"Seed: {5 + i}," in img.info["parameters"]


def test_one_prompt_per_image(pipe):
    """prompts=[...]: one batch, image i with prompts[i] and seed + i (training's sample grids)."""
    prompts = ["a red circle", "two blue squares", "a red circle"]
    batch = pipe.generate(S("ignored", seed=5, steps=3), n=7, prompts=prompts)
    assert len(batch) == 3
    for i, img in enumerate(batch):
        single = pipe.generate(S(prompts[i], seed=5 + i, steps=3))[0]
        assert same_up_to_rounding(img, single), f"image {i}"
        assert img.info["parameters"].startswith(prompts[i] + "\n") and f"Seed: {5 + i}," in img.info["parameters"]
    with pytest.raises(UsageError, match="the prompt is empty"):
        pipe.generate(S("x", steps=3), prompts=["a red circle", " "])
    with pytest.raises(UsageError, match="the prompt is empty"):
        pipe.generate(S("x", steps=3), prompts=[])


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n not in DISTILLED_ONLY])
def test_seed_alone_determines_pixels_for_every_scheduler(pipe, name):
    torch.manual_seed(1)  # the global RNG must not matter
    a = pipe.generate(S(PROMPT, seed=3, steps=4, scheduler=name), n=2)
    torch.manual_seed(2)
    again = pipe.generate(S(PROMPT, seed=3, steps=4, scheduler=name), n=2)
    assert all(np.array_equal(px(x), px(y)) for x, y in zip(a, again)), "same seed, different pixels"
    torch.manual_seed(3)
    single = [pipe.generate(S(PROMPT, seed=3 + i, steps=4, scheduler=name), n=1)[0] for i in range(2)]
    assert same_up_to_rounding(a[0], single[0]) and same_up_to_rounding(a[1], single[1]), \
        "image i of a batch differs from a single image at seed + i"


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n not in DISTILLED_ONLY])
def test_every_scheduler_runs(pipe, name):
    seen = []
    img = pipe.generate(S(PROMPT, steps=3, scheduler=name), callback=seen.append)[0]
    assert seen and seen[-1]["i"] == len(seen) - 1 and seen[-1]["total"] == len(seen)
    assert all(torch.isfinite(s["latents"]).all() for s in seen)
    a = px(img)
    assert a.shape == (NATIVE, NATIVE, 3) and a.std() > 0
    assert f"Sampler: {name}," in img.info["parameters"]


def test_list_schedulers(capsys):
    assert main(["generate", "--list-schedulers"]) == 0
    text = capsys.readouterr().out
    for name, (cls, _) in SCHEDULERS.items():
        assert re.search(rf"(^|\n){re.escape(name)}\s+{cls}", text), name
    listed = [l for l in text.splitlines() if l.strip()]
    assert len(listed) == len(SCHEDULERS)


# ---------------------------------------------------------------- img2img and inpainting


def test_img2img_strength(pipe, init_image):
    same = pipe.generate(S(PROMPT, steps=4, strength=0.0), init_image=init_image)[0]
    assert np.abs(px(same) - px(init_image)).max() <= 2
    redone = pipe.generate(S(PROMPT, steps=4, strength=1.0), init_image=init_image)[0]
    assert np.abs(px(redone) - px(init_image)).mean() > 10
    half = pipe.generate(S(PROMPT, steps=4, strength=0.5), init_image=init_image)[0]
    assert "Denoising strength: 0.5" in half.info["parameters"]
    assert "Denoising strength" not in pipe.generate(S(PROMPT, steps=2))[0].info["parameters"]


def test_img2img_resizes_init_image(pipe, init_image):
    big = init_image.resize((64, 64), Image.NEAREST)
    out = pipe.generate(S(PROMPT, steps=4, strength=0.0), init_image=big)[0]
    assert out.size == (NATIVE, NATIVE)


@pytest.mark.parametrize("name", ["DPM++ 2M", "Euler", "Heun", "DDIM"])
def test_inpainting_keeps_unmasked_pixels(pipe, init_image, name):
    mask = Image.new("L", init_image.size, 0)
    mask.paste(255, (0, 0, NATIVE // 2, NATIVE))  # white = repaint the left half
    out = px(pipe.generate(S(PROMPT, steps=4, strength=0.75, scheduler=name), init_image=init_image, mask=mask)[0])
    ref = px(init_image)
    assert np.array_equal(out[:, NATIVE // 2:], ref[:, NATIVE // 2:])
    assert np.abs(out[:, :NATIVE // 2] - ref[:, :NATIVE // 2]).mean() > 10


def test_init_image_array_is_writable(pipe, init_image, monkeypatch):
    """torch.from_numpy on a read-only array warns; the CLI prints every UserWarning it sees."""
    seen = []
    real = torch.from_numpy

    def spy(a):
        seen.append(a.flags.writeable)
        return real(a)

    monkeypatch.setattr(torch, "from_numpy", spy)
    pipe.generate(S(PROMPT, steps=2, strength=0.5), init_image=init_image)
    assert seen and all(seen)


# ---------------------------------------------------------------- PNG metadata


A1111_LINE = re.compile(r"^Steps: (\d+), Sampler: ([^,]+), CFG scale: ([\d.]+), Seed: (\d+), Size: (\d+)x(\d+), "
                        r"Model hash: ([0-9a-f]{10}), Model: ([^,]+)(, .+)?$")


def test_png_parameters_a1111_format_and_info(model_dir, pipe, tmp_path, capsys):
    out = tmp_path / "p.png"
    assert cli("generate", PROMPT, "--model", model_dir, "--steps", 3, "--scheduler", "Euler", "--guidance", 5.5,
               "--seed", 7, "--negative", "blurry, gray", "--out", out) == 0
    capsys.readouterr()
    with Image.open(out) as im:
        text = im.info["parameters"]
    lines = text.split("\n")
    assert lines[0] == PROMPT
    assert lines[1] == "Negative prompt: blurry, gray"
    m = A1111_LINE.match(lines[2])
    assert m, lines[2]
    assert m.groups()[:8] == ("3", "Euler", "5.5", "7", "32", "32", pipe.hash, "tiny-sd")
    parsed = parse_parameters(text)
    assert parsed["prompt"] == PROMPT and parsed["negative_prompt"] == "blurry, gray"
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"], parsed["Size"]) == \
        ("3", "Euler", "5.5", "7", "32x32")
    assert parsed["Model hash"] == pipe.hash and parsed["Model"] == "tiny-sd"

    assert cli("info", out) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == text
    assert parse_parameters(printed) == parsed


def test_parameters_without_negative(pipe):
    text = pipe.generate(S(PROMPT, steps=2, seed=3))[0].info["parameters"]
    assert "Negative prompt" not in text
    prompt, line = text.split("\n")
    assert prompt == PROMPT and A1111_LINE.match(line)


@pytest.mark.parametrize("settings", [
    GenerationSettings("a red circle", "", 1, 20, 4.0, "DPM++ 2M", 32, 32),
    GenerationSettings("a red circle\non two lines", "ugly,\nbad", 42, 7, 7.5, "Euler a", 64, 32, 0.6),
    GenerationSettings("two blue squares", "x", 0, 1, 1.0, "DPM++ 2M Karras", 32, 64, None, {"Clip skip": 2}),
])
def test_parse_parameters_round_trip(settings):
    parsed = parse_parameters(settings.parameters("tiny-sd", "0123456789"))
    assert parsed["prompt"] == settings.prompt and parsed["negative_prompt"] == settings.negative
    assert int(parsed["Steps"]) == settings.steps and parsed["Sampler"] == settings.scheduler
    assert float(parsed["CFG scale"]) == settings.guidance and int(parsed["Seed"]) == settings.seed
    assert parsed["Size"] == f"{settings.width}x{settings.height}"
    assert parsed["Model hash"] == "0123456789" and parsed["Model"] == "tiny-sd"
    if settings.strength is None:
        assert "Denoising strength" not in parsed
    else:
        assert float(parsed["Denoising strength"]) == settings.strength
    for k, v in settings.extra.items():
        assert parsed[k] == str(v)


# ---------------------------------------------------------------- batches, index and grids


def test_prompts_file_index_and_grid(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\n  two blue squares  \n", encoding="utf-8")
    out = tmp_path / "batch"
    assert cli("generate", "--prompts", prompts, "--model", model_dir, "-n", 2, "--seed", 10, "--steps", 2,
               "--scheduler", "DDIM", "--grid", "--out", out) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(l) for l in (out / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["two blue squares"] * 2
    assert [r["seed"] for r in rows] == [10, 11, 12, 13]
    for r in rows:
        assert not Path(r["file"]).is_absolute() and (out / r["file"]).is_file()
        assert r["steps"] == 2 and r["scheduler"] == "DDIM" and r["guidance"] == 4.0
        with Image.open(out / r["file"]) as im:
            assert im.info["parameters"] == r["parameters"]
        assert parse_parameters(r["parameters"])["prompt"] == r["prompt"]
        assert parse_parameters(r["parameters"])["Seed"] == str(r["seed"])
    assert len({r["file"] for r in rows}) == 4
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * NATIVE
    names = {p.name for p in out.iterdir()}
    assert names == {r["file"] for r in rows} | {"index.jsonl", "grid.png"}  # no temporary files left
    printed = [l for l in stdout.splitlines() if l.strip()]
    assert {Path(l) for l in printed} == {out / r["file"] for r in rows} | {out / "grid.png"}


def test_png_out_with_several_images(model_dir, tmp_path, capsys):
    assert cli("generate", PROMPT, "--model", model_dir, "-n", 2, "--steps", 2, "--grid",
               "--out", tmp_path / "pic.png") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic-0.png", "pic-1.png", "pic-grid.png"]


# ---------------------------------------------------------------- long prompts


def test_long_prompt_is_encoded_whole_without_a_warning(model_dir, pipe, tmp_path, capsys):
    """Past the context, a prompt is encoded in chunks (AUTOMATIC1111's way), not cut: tests/test_prompts.py."""
    tok = pipe.tokenizer
    assert len(tok(LONG_PROMPT, truncation=False).input_ids) > tok.model_max_length  # really too long
    assert cli("generate", LONG_PROMPT, "--model", model_dir, "--steps", 2, "--out", tmp_path / "o.png") == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "dropped" not in err and "Traceback" not in err
    with Image.open(tmp_path / "o.png") as im:
        assert parse_parameters(im.info["parameters"])["prompt"] == LONG_PROMPT


# ---------------------------------------------------------------- bad input


def _junk_png(tmp: Path) -> Path:
    p = tmp / "inputs" / "junk.png"
    p.write_bytes(np.random.default_rng(0).bytes(2000))
    return p


def _small_mask(tmp: Path) -> Path:
    p = tmp / "inputs" / "mask.png"
    Image.new("L", (16, 16), 255).save(p)
    return p


def _no_unet(tmp: Path, model_dir: Path) -> Path:
    dst = tmp / "inputs" / "no-unet"
    shutil.copytree(model_dir, dst)
    shutil.rmtree(dst / "unet")
    return dst


def _bad_weights(tmp: Path, model_dir: Path) -> Path:
    dst = tmp / "inputs" / "bad-weights"
    shutil.copytree(model_dir, dst)
    (dst / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
    return dst


def _inpainting(tmp: Path, model_dir: Path) -> Path:
    """A Stable Diffusion inpainting folder: its UNet takes latents, mask and masked-image latents (9 channels)."""
    from diffusers import UNet2DConditionModel

    dst = tmp / "inputs" / "inpainting"
    shutil.copytree(model_dir, dst)
    cfg = dict(UNet2DConditionModel.load_config(model_dir / "unet"), in_channels=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        UNet2DConditionModel.from_config(cfg).save_pretrained(dst / "unet", safe_serialization=True)
    return dst


def _pickle_only(tmp: Path, model_dir: Path) -> Path:
    """A folder whose UNet weights are a pickle .bin file only."""
    from diffusers import UNet2DConditionModel

    dst = tmp / "inputs" / "pickled"
    shutil.copytree(model_dir, dst)
    UNet2DConditionModel.from_pretrained(model_dir / "unet").save_pretrained(dst / "unet", safe_serialization=False)
    (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert (dst / "unet" / "diffusion_pytorch_model.bin").is_file()
    return dst


def _single_file(tmp: Path, model_dir: Path) -> Path:
    dst = tmp / "inputs" / "model.safetensors"
    shutil.copy(model_dir / "unet" / "diffusion_pytorch_model.safetensors", dst)
    return dst


def _comments_only(tmp: Path) -> Path:
    p = tmp / "inputs" / "prompts.txt"
    p.write_text("# nothing here\n\n", encoding="utf-8")
    return p


# (id, argv builder, allowed exit codes, words the message must contain)
BAD_INPUTS = [
    ("unknown-scheduler", lambda t, m, i: [PROMPT, "--model", m, "--scheduler", "Euler b"], {2}, ["unknown scheduler", "Euler b"]),
    ("steps-0", lambda t, m, i: [PROMPT, "--model", m, "--steps", 0], {2}, ["--steps"]),
    ("size-huge", lambda t, m, i: [PROMPT, "--model", m, "--size", 100000], {2}, ["--size", "100000"]),
    ("size-not-multiple", lambda t, m, i: [PROMPT, "--model", m, "--size", 33], {2}, ["--size", "multiple"]),
    ("size-garbage", lambda t, m, i: [PROMPT, "--model", m, "--size", "big"], {2}, ["--size"]),
    ("num-images-0", lambda t, m, i: [PROMPT, "--model", m, "-n", 0], {2}, ["--num-images"]),
    ("guidance-100", lambda t, m, i: [PROMPT, "--model", m, "--guidance", 100], {2}, ["--guidance"]),
    ("strength-2", lambda t, m, i: [PROMPT, "--model", m, "--init-image", i, "--strength", 2], {2}, ["--strength"]),
    ("unreadable-init", lambda t, m, i: [PROMPT, "--model", m, "--init-image", _junk_png(t)], {1, 2}, ["junk.png"]),
    ("mask-wrong-size", lambda t, m, i: [PROMPT, "--model", m, "--init-image", i, "--mask", _small_mask(t)], {2},
     ["--mask", "16x16"]),
    ("empty-prompt", lambda t, m, i: ["", "--model", m], {2}, ["PROMPT"]),
    ("blank-prompt", lambda t, m, i: ["   ", "--model", m], {2}, ["empty"]),
    ("mask-without-init", lambda t, m, i: [PROMPT, "--model", m, "--mask", _small_mask(t)], {2}, ["--init-image"]),
    ("model-missing", lambda t, m, i: [PROMPT, "--model", t / "inputs" / "no-such-model"], {2},
     ["no-such-model", "does not exist"]),
    ("model-without-unet", lambda t, m, i: [PROMPT, "--model", _no_unet(t, m)], {2}, ["unet"]),
    ("model-bad-weights", lambda t, m, i: [PROMPT, "--model", _bad_weights(t, m)], {1}, ["cannot load model"]),
    ("model-inpainting", lambda t, m, i: [PROMPT, "--model", _inpainting(t, m)], {2},
     ["9 input channels", "inpainting", "4 latent channels", "--mask"]),
    ("model-pickle-weights", lambda t, m, i: [PROMPT, "--model", _pickle_only(t, m)], {2},
     ["diffusion_pytorch_model.bin", "pickle", "run code", "save_pretrained", "safe_serialization=True"]),
    ("model-single-file", lambda t, m, i: [PROMPT, "--model", _single_file(t, m)], {2},
     ["single-file checkpoint", "from_single_file"]),
    ("prompts-file-empty", lambda t, m, i: ["--prompts", _comments_only(t), "--model", m], {2}, ["no prompts"]),
    ("prompt-and-prompts", lambda t, m, i: [PROMPT, "--prompts", _comments_only(t), "--model", m], {2}, ["not both"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, model_dir, init_image, tmp_path, capsys):
    _, argv, codes, words = case
    (tmp_path / "inputs").mkdir()
    init_path = tmp_path / "inputs" / "init.png"
    init_image.save(init_path)
    out = tmp_path / "out"
    rc = cli("generate", *argv(tmp_path, model_dir, init_path), "--out", out)
    captured = capsys.readouterr()
    err = captured.err
    assert rc in codes, (rc, err)
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert err.startswith("error: "), err
    for w in words:
        assert flat(w) in flat(err), (w, err)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    one_line(err)


def test_library_rejects_bad_settings(pipe, init_image):
    with pytest.raises(UsageError, match="unknown scheduler"):
        pipe.generate(S(PROMPT, scheduler="nope"))
    with pytest.raises(UsageError, match="--steps"):
        pipe.generate(S(PROMPT, steps=0))
    with pytest.raises(UsageError, match="--size"):
        pipe.generate(S(PROMPT, width=33, height=33))
    with pytest.raises(UsageError, match="empty"):
        pipe.generate(S(""))
    with pytest.raises(UsageError, match="--init-image"):
        pipe.generate(S(PROMPT), mask=Image.new("L", (32, 32)))
    with pytest.raises(UsageError, match="must match"):
        pipe.generate(S(PROMPT, steps=2), init_image=init_image, mask=Image.new("L", (16, 16)))


# ---------------------------------------------------------------- messages


def test_audit_says_why_no_judge_applies(model_dir, tmp_path, capsys):
    """A prompt outside ShapesWorld with a model that has a CLIP: the reason is not "no CLIP model"."""
    from searchkit import make_tiny_model

    from sfumato import explain

    model = tmp_path / "with-clip"
    shutil.copytree(model_dir, model)
    make_tiny_model(tmp_path / "clip-src")
    shutil.copytree(tmp_path / "clip-src" / "clip", model / "clip")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert cli("explain", "audit", img, "--prompt", "a photo of a dog on the beach", "--model", model, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["ok"] is None
    reason = rows[0]["reason"]
    assert "no CLIP model" not in reason and "ShapesWorld" in reason and "CLIP to swap" in reason
    assert "attention" in reason
    alone = explain.audit(Image.new("RGB", (32, 32)), "a photo of a dog")[0].reason  # no CLIP given at all
    assert "no CLIP model" in alone and "attention" not in alone


def test_train_lists_every_config_key_with_default_and_range(capsys):
    import dataclasses

    from sfumato.config import RANGES, TrainCfg

    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            yield from keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [(prefix + f.name, v)]

    want = list(keys(TrainCfg()))
    assert [l.split(" = ")[0] for l in lines] == [k for k, _ in want]
    for line, (key, default) in zip(lines, want):
        assert line.startswith(f"{key} = {default!r}"), line
        if key in RANGES:
            assert f"[{RANGES[key][0]:g} to" in line or f"[{RANGES[key][0]} to" in line, line
    assert any(l.startswith("unet.lr = ") and "presets: " in l and "small 0.001" in l for l in lines)
