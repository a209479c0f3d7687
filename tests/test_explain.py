"""Explain: cross-attention capture, per-word maps, grounding, the adherence audit, and the CLI
(`sfumato explain ...`, `sfumato generate --explain/--audit/--neighbours/--index`).

The models are tiny and random (tests/test_generate.py's SD folder, tests/searchkit.py's CLIP), so
the maps mean nothing: these tests check shapes, order, ranges, files and contracts, not quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato import explain
from sfumato.attention import AttentionStore, capture_cross_attention, normalise, word_token_spans
from sfumato.cli import main
from sfumato.errors import UsageError
from sfumato.config import GenerationSettings as S
from sfumato.shapesworld.render import Obj, Scene, make_scene, render
from searchkit import make_images, make_tiny_model
from test_generate import build_tiny_sd, same_up_to_rounding

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from diffusers' schedulers

PROMPT = "a red circle above a blue square"
LONG_PROMPT = ("a small red circle to the left of a large blue square on a white background "
               "and two green triangles above three yellow crosses")
REL_SCENE = 6  # make_scene(0, 6): "a green cross on the right of a tiny purple circle" (a relation)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explain")


@pytest.fixture(scope="module")
def sd(root) -> Path:
    return build_tiny_sd(root / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(sd):
    return sfumato.load(sd)


@pytest.fixture(scope="module")
def no_unet(root, sd) -> Path:
    dst = root / "no-unet"
    shutil.copytree(sd, dst)
    shutil.rmtree(dst / "unet")
    return dst


@pytest.fixture(scope="module")
def clip_kit(root, sd):
    """The tiny SD folder plus a clip/ (what Embedder loads), and an index built with that CLIP."""
    model = root / "tiny-sd-clip"
    shutil.copytree(sd, model)
    make_tiny_model(root / "clip-src")
    shutil.copytree(root / "clip-src" / "clip", model / "clip")
    images = make_images(root / "images", n=6)
    assert main(["index", "build", str(images), "--out", str(root / "ix"), "--model", str(model)]) == 0
    return {"model": model, "index": root / "ix"}


@pytest.fixture(scope="module")
def rel_scene():
    scene = make_scene(0, REL_SCENE)
    assert scene.meta.get("relation")  # the audit tests want a relation prompt
    return scene


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at 80 columns when it is not a terminal; keep long paths and JSON on one line."""
    monkeypatch.setenv("COLUMNS", "2000")


def cli(*args) -> int:
    return main([str(a) for a in args])


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return lines[0]


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


def cross_heads(unet) -> int:
    heads = {m.heads for name, m in unet.named_modules() if name.endswith("attn2")}
    assert len(heads) == 1
    return heads.pop()


def proc_types(unet) -> dict:
    return {k: type(v) for k, v in unet.attn_processors.items()}


def unet_inputs(pipe, batch: int, h: int = 8, w: int = 16, prompt: str = "a red circle"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, h, w), generator=g)
    text, _ = pipe.encode([prompt] * batch)
    return x, torch.tensor(500), text


def spy_on_words(monkeypatch) -> list:
    """Record the words whose maps ground() sums, one list per phrase."""
    seen = []
    real = explain.token_maps_to_words

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append([w for w, _ in out])
        return out

    monkeypatch.setattr(explain, "token_maps_to_words", spy)
    return seen


def save_render(scene, path: Path) -> Path:
    render(scene).save(path)
    return path


# ---------------------------------------------------------------- attention capture


def test_capture_records_maps_at_requested_size(pipe):
    x, t, text = unet_inputs(pipe, 2)  # latent 8x16 -> layer grid 4x8: the aspect of a 24x48 image
    with torch.no_grad(), capture_cross_attention(pipe.unet, 24, 48) as store:
        pipe.unet(x, t, encoder_hidden_states=text)
    assert isinstance(store, AttentionStore) and store.calls > 0
    maps = store.maps()
    assert maps.shape == (2, pipe.tokenizer.model_max_length, 24, 48)
    assert (maps >= 0).all()
    # softmax probabilities over the tokens, summed over heads, averaged over layers
    assert torch.allclose(maps.sum(1), torch.full((2, 24, 48), float(cross_heads(pipe.unet))), atol=1e-4)


def test_capture_with_cfg_keeps_the_conditional_half(pipe):
    x, t, cond = unet_inputs(pipe, 2)
    uncond, _ = pipe.encode([""] * 2)
    with torch.no_grad(), capture_cross_attention(pipe.unet, 16, 32, cfg=True) as both:
        pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]))
    with torch.no_grad(), capture_cross_attention(pipe.unet, 16, 32) as cond_only:
        pipe.unet(x, t, encoder_hidden_states=cond)
    with torch.no_grad(), capture_cross_attention(pipe.unet, 16, 32) as uncond_only:
        pipe.unet(x, t, encoder_hidden_states=uncond)
    assert both.maps().shape[0] == 2
    assert torch.allclose(both.maps(), cond_only.maps(), atol=1e-5)
    assert not torch.allclose(both.maps(), uncond_only.maps(), atol=1e-3)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_generation_capture_has_one_map_per_image(pipe, guidance):
    with explain.generation_capture(pipe, 0, guidance) as store:
        images = pipe.generate(S("a red circle", steps=2, guidance=guidance), n=2)
    assert len(images) == 2
    assert store.maps().shape == (2, pipe.tokenizer.model_max_length, pipe.native, pipe.native)


def test_capture_restores_processors(pipe):
    before = proc_types(pipe.unet)
    assert any(k.endswith("attn2.processor") for k in before)
    with capture_cross_attention(pipe.unet, 32, 32):
        during = proc_types(pipe.unet)
        for k, v in during.items():
            if k.endswith("attn2.processor"):
                assert v is not before[k]  # replaced by the storing processor
            else:
                assert v is before[k]  # self-attention keeps its fast processor
    assert proc_types(pipe.unet) == before
    with pytest.raises(KeyError, match="boom"):
        with capture_cross_attention(pipe.unet, 32, 32):
            raise KeyError("boom")
    assert proc_types(pipe.unet) == before


def test_capture_on_unet_without_cross_attention_raises():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D",) * 2,
                                up_block_types=("UpBlock2D",) * 2, mid_block_type=None, cross_attention_dim=8,
                                norm_num_groups=4)
    before = proc_types(unet)
    with pytest.raises(ValueError, match="cross-attention"):
        with capture_cross_attention(unet, 32, 32):
            pass
    assert proc_types(unet) == before


def test_finest_store_keeps_only_the_finest_layers_in_any_order():
    def layer(hw, value):  # (batch * heads, H*W, T): one head, two tokens
        return torch.full((1, hw, 2), value)

    store = AttentionStore(8, 8, finest=True)
    for hw, v in ((4, 9.0), (16, 1.0), (4, 9.0), (16, 3.0), (1, 9.0)):  # coarse first, finer later
        store.add(layer(hw, v), 1, 1)
    assert store.calls == 2 and torch.allclose(store.maps(), torch.full((1, 2, 8, 8), 2.0))
    every = AttentionStore(8, 8)
    for hw, v in ((4, 9.0), (16, 1.0)):
        every.add(layer(hw, v), 1, 1)
    assert torch.allclose(every.maps(), torch.full((1, 2, 8, 8), 5.0))


def test_empty_store_is_an_error():
    with pytest.raises(RuntimeError, match="no cross-attention"):
        AttentionStore(8, 8).maps()


def test_capturing_processor_does_not_change_the_unet_output(pipe):
    x, t, text = unet_inputs(pipe, 2)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=text).sample
        with capture_cross_attention(pipe.unet, 16, 32):
            captured = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(plain, captured, atol=1e-5)


def test_word_maps_image_equals_plain_generation(pipe):
    wm = explain.word_maps(pipe, S(PROMPT, seed=1, steps=3))
    plain = pipe.generate(S(PROMPT, seed=1, steps=3))[0]
    # the recording attention processor may sum in another order than the default one
    assert same_up_to_rounding(wm.image, plain)
    assert wm.image.info["parameters"] == plain.info["parameters"]


# ---------------------------------------------------------------- words and their maps


def test_word_token_spans_cover_the_prompt_without_start_and_end(pipe):
    tok = pipe.tokenizer
    ids = tok(PROMPT).input_ids
    spans = word_token_spans(tok, PROMPT)
    assert [w for w, _ in spans] == PROMPT.split()
    positions = [p for _, span in spans for p in span]
    assert positions == list(range(1, len(ids) - 1))  # ids[0] is the start token, ids[-1] the end token
    assert any(len(span) > 1 for _, span in spans)  # a word of several tokens ("above" in this vocabulary)
    for word, span in spans:
        assert [ids[p] for p in span] == tok(word, add_special_tokens=False).input_ids


def test_word_maps_one_per_word_in_order(pipe):
    wm = explain.word_maps(pipe, S(PROMPT, seed=2, steps=2))
    assert wm.words == PROMPT.split()
    assert wm.maps.shape == (len(wm.words), wm.image.height, wm.image.width) == (7, pipe.native, pipe.native)
    assert wm.maps.min() >= 0 and wm.maps.max() <= 1 + 1e-6
    # the same maps by hand: each word's tokens summed, scaled to [0, 1]
    with explain.generation_capture(pipe) as store:
        pipe.generate(S(PROMPT, seed=2, steps=2))
    tokens = store.maps()[0]
    want = normalise(torch.stack([tokens[span].sum(0) for _, span in word_token_spans(pipe.tokenizer, PROMPT)]))
    assert np.allclose(wm.maps, want.numpy(), atol=1e-5)


def test_word_maps_of_a_long_prompt_cover_every_chunk(pipe):
    """A prompt past the context is encoded in chunks (sfumato.prompts): every word gets its map."""
    tok = pipe.tokenizer
    assert len(tok(LONG_PROMPT).input_ids) > tok.model_max_length
    wm = explain.word_maps(pipe, S(LONG_PROMPT, steps=2))
    assert wm.words == LONG_PROMPT.split()
    assert wm.maps.shape == (len(wm.words), pipe.native, pipe.native)


def test_word_maps_save(pipe, tmp_path):
    wm = explain.word_maps(pipe, S("a red circle", steps=2))
    wm.save(tmp_path / "w.png", tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as z:
        assert list(z["words"]) == ["a", "red", "circle"]
        assert z["maps"].shape == (3, pipe.native, pipe.native) and z["maps"].dtype == np.float32
    with Image.open(tmp_path / "w.png") as im:
        assert im.format == "PNG" and im.width > im.height  # image + 3 panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz", "w.png"]


def test_word_maps_with_size(pipe):
    wm = explain.word_maps(pipe, S("a red circle", steps=2, width=32, height=64))
    assert wm.image.size == (32, 64) and wm.maps.shape == (3, 64, 32)


# ---------------------------------------------------------------- grounding


def test_ground_maps_at_the_image_size_one_per_phrase_in_order(pipe, rel_scene, monkeypatch):
    img = render(rel_scene)  # 64x64: twice the model's native 32
    assert img.size != (pipe.native, pipe.native)
    seen = spy_on_words(monkeypatch)
    g = explain.ground(pipe, img, ["green cross", "purple circle"])
    assert seen == [["green", "cross"], ["purple", "circle"]]  # content words only: no article
    assert g.phrases == ["green cross", "purple circle"]
    assert g.maps.shape == (2, 64, 64) and g.maps.min() >= 0 and g.maps.max() <= 1 + 1e-6
    assert g.image.size == img.size
    swapped = explain.ground(pipe, img, ["purple circle", "green cross"])
    assert np.allclose(swapped.maps, g.maps[::-1], atol=1e-5)
    alone = explain.ground(pipe, img, ["green cross"])
    assert alone.maps.shape == (1, 64, 64) and np.allclose(alone.maps[0], g.maps[0], atol=1e-5)
    assert not np.allclose(g.maps[0], g.maps[1], atol=1e-3)
    peaks = g.peaks()
    assert len(peaks) == 2 and all(0 <= x < 64 and 0 <= y < 64 for x, y in peaks)
    for (x, y), m in zip(peaks, g.maps):
        assert m[y, x] == m.max()


@pytest.mark.parametrize("size", [(50, 70), (70, 50)])
def test_ground_non_square_image_keeps_its_size(pipe, size):
    img = Image.new("RGB", size, "white")
    g = explain.ground(pipe, img, ["red circle", "blue square"])
    assert g.maps.shape == (2, size[1], size[0])


def test_ground_rejects_bad_phrases(pipe):
    img = Image.new("RGB", (32, 32), "white")
    with pytest.raises(UsageError, match="'the a'"):
        explain.ground(pipe, img, ["red circle", "the a"])
    long = " ".join(["red"] * 20)
    limit = pipe.tokenizer.model_max_length
    with pytest.raises(UsageError, match=rf"(?s){long!r}.*{limit}"):
        explain.ground(pipe, img, [long])
    with pytest.raises(UsageError, match="at least one phrase"):
        explain.ground(pipe, img, [])


def test_ground_phrase_at_the_context_limit_is_refused_or_whole(pipe, monkeypatch):
    tok = pipe.tokenizer
    phrase = " ".join(["red"] * (tok.model_max_length - 3) + ["circle"])
    assert len(tok(phrase).input_ids) == tok.model_max_length  # fits, start and end tokens included
    seen = spy_on_words(monkeypatch)
    try:
        explain.ground(pipe, Image.new("RGB", (32, 32)), [phrase])
    except UsageError:
        return  # refusing the phrase is fine
    assert seen and "circle" in seen[0]  # otherwise its last word must be in the map


def test_grounding_save(pipe, rel_scene, tmp_path):
    g = explain.ground(pipe, render(rel_scene), ["green cross", "purple circle"])
    out = tmp_path / "where"
    g.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["where"]  # no where.partial left
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps.npz", "overlay.png"]
    with np.load(out / "heatmaps.npz") as z:
        assert sorted(z.files) == ["00", "01", "phrases"]
        assert list(z["phrases"]) == ["green cross", "purple circle"]
        for i in range(2):
            assert z[f"{i:02d}"].shape == (64, 64) and np.allclose(z[f"{i:02d}"], g.maps[i])
    with Image.open(out / "overlay.png") as im:
        assert im.format == "PNG"
    g.phrases, g.maps = g.phrases[:1], g.maps[:1]
    g.save(out)  # over an existing folder: replaced whole
    with np.load(out / "heatmaps.npz") as z:
        assert sorted(z.files) == ["00", "phrases"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["where"]


# ---------------------------------------------------------------- audit (library)


def test_audit_without_any_judge_gives_one_unjudged_row():
    rows = explain.audit(Image.new("RGB", (64, 64)), "a photo of a dog on the beach")
    assert len(rows) == 1 and rows[0].ok is None and rows[0].source == "none"
    assert set(rows[0].to_dict()) == {"words", "ok", "reason", "source"}
    with pytest.raises(UsageError, match="empty"):
        explain.audit(Image.new("RGB", (64, 64)), "   ")


def test_checker_rows_count_word_fails():
    squares = [Obj("square", "red", "small", bbox=(6, 6, 18, 18)), Obj("square", "red", "small", bbox=(36, 36, 48, 48))]
    img = render(Scene("white", squares, "counting"))
    rows = explain.checker_rows(img, "three red squares")
    by_words = {r.words: r for r in rows}
    assert by_words["three red squares"].ok is False and "2" in by_words["three red squares"].reason
    assert by_words["(whole prompt)"].ok is False
    ok = {r.words: r.ok for r in explain.checker_rows(img, "two red squares")}
    assert ok["two red squares"] is True and ok["(whole prompt)"] is True
    assert explain.checker_rows(img, "a photo of a dog") is None


def test_word_swaps_of_a_relation_prompt():
    prompt = "a red circle to the left of a blue square"
    swaps = explain.word_swaps(prompt)
    assert [w for w, _, _ in swaps] == ["to the left of", "red", "circle", "blue", "square"]
    for word, alts, k in swaps:
        assert alts[k] == prompt, word
        assert len(alts) == len(set(alts)) > 1
        assert all(len(a.split()) >= len(prompt.split()) - 3 for a in alts)
    rel = dict((w, alts) for w, alts, _ in swaps)["to the left of"]
    assert "a red circle to the right of a blue square" in rel
    assert "a red circle above a blue square" in rel and "a red circle below a blue square" in rel
    assert "a red circle to the left of a green square" in dict((w, a) for w, a, _ in swaps)["blue"]


@pytest.mark.parametrize("prompt, word", [("a tiny red circle", "tiny"), ("a red circle.", "circle.")])
def test_word_swaps_keep_the_original_wording(prompt, word):
    swaps = {w: (alts, k) for w, alts, k in explain.word_swaps(prompt)}
    alts, k = swaps[word]
    assert alts[k] == prompt


# ---------------------------------------------------------------- generate.run hooks


def test_run_calls_after_for_each_image(pipe, tmp_path):
    from sfumato import generate as gen

    calls = []

    def after(img, prompt, path):
        assert path.is_file()  # written before the hook runs
        calls.append((img.size, prompt, path))
        extra = path.with_suffix(".txt")
        extra.write_text(prompt)
        return [extra]

    paths = gen.run(pipe, ["a red circle"], S("", seed=5, steps=2), tmp_path / "o", 2, False, False, progress=False,
                    explain=True, after=after)
    assert len(calls) == 2 and all(c[1] == "a red circle" for c in calls)
    pngs = [c[2] for c in calls]
    for p in pngs:
        assert p in paths and p.with_suffix(".txt") in paths
        assert p.with_suffix(".words.png") in paths and p.with_suffix(".maps.npz") in paths
    assert len(paths) == 8


# ---------------------------------------------------------------- CLI: explain generate / generate --explain


def test_cli_explain_generate(sd, pipe, tmp_path, capsys):
    out = tmp_path / "why"
    assert cli("explain", "generate", PROMPT, "--model", sd, "--out", out, "--steps", 2) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / n) for n in ("image.png", "words.png", "maps.npz")]
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "maps.npz", "words.png"]
    assert not (tmp_path / "why.partial").exists()
    with Image.open(out / "image.png") as im:
        params = im.text["parameters"]
        assert params.startswith(PROMPT) and "Steps: 2" in params
        # The same picture: capturing computes attention probabilities explicitly where plain
        # sampling uses fused attention, so a rounding may flip a pixel by a level.
        assert np.abs(px(im) - px(pipe.generate(S(PROMPT, seed=0, steps=2))[0])).max() <= 2
    with np.load(out / "maps.npz") as z:
        assert list(z["words"]) == PROMPT.split()
        assert z["maps"].shape == (7, pipe.native, pipe.native)
    with Image.open(out / "words.png") as im:
        assert im.format == "PNG"


def test_cli_generate_explain_writes_maps_beside_each_image(sd, pipe, tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli("generate", "a red circle", "--model", sd, "--out", out, "--steps", 2, "-n", 2, "--seed", 3,
               "--explain") == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(p for p in out.glob("*.png") if not p.name.endswith(".words.png"))
    assert len(pngs) == 2
    maps = []
    for p in pngs:
        assert p.with_suffix(".words.png").is_file() and p.with_suffix(".maps.npz").is_file()
        assert {str(p), str(p.with_suffix(".words.png")), str(p.with_suffix(".maps.npz"))} <= set(printed)
        with np.load(p.with_suffix(".maps.npz")) as z:
            assert list(z["words"]) == ["a", "red", "circle"] and z["maps"].shape == (3, pipe.native, pipe.native)
            maps.append(z["maps"])
    assert not np.allclose(maps[0], maps[1])  # image i gets its own maps, not image 0's
    assert len(list(out.iterdir())) == 6


def test_cli_generate_audit(sd, tmp_path, capsys):
    assert cli("generate", "a red circle", "--model", sd, "--out", tmp_path / "a.png", "--steps", 2, "--audit") == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a.png'}: 'a red circle'" in out
    assert "'(whole prompt)'" in out and "[checker]" in out


def test_cli_generate_explain_with_strength_zero(sd, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "white").save(init)
    rc = cli("generate", "a red circle", "--model", sd, "--out", tmp_path / "o.png", "--steps", 2,
             "--init-image", init, "--strength", 0, "--explain")
    err = capsys.readouterr().err
    assert rc in (0, 2) and "RuntimeError" not in err, err


# ---------------------------------------------------------------- CLI: explain image


def test_cli_explain_image_json(sd, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    out = tmp_path / "where"
    assert cli("explain", "image", img, "--text", "green cross", "--text", "purple circle", "--out", out,
               "--model", sd, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["phrases"] == ["green cross", "purple circle"]
    assert len(res["peaks"]) == 2 and all(0 <= x < 64 and 0 <= y < 64 for x, y in res["peaks"])
    assert res["probabilities"] is None and res["closest_captions"] == []  # no CLIP in this folder
    assert res["heatmaps"] == str(out / "heatmaps.npz") and res["overlay"] == str(out / "overlay.png")
    with np.load(out / "heatmaps.npz") as z:
        assert z["00"].shape == (64, 64) and list(z["phrases"]) == res["phrases"]
        assert [list(np.unravel_index(z[k].argmax(), z[k].shape)[::-1]) for k in ("00", "01")] == res["peaks"]


def test_cli_explain_image_with_clip_and_index(clip_kit, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    assert cli("explain", "image", img, "--text", "green cross", "--text", "purple circle", "--out",
               tmp_path / "w", "--model", clip_kit["model"], "--index", clip_kit["index"], "-k", 2, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["probabilities"]) == 2 and sum(res["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert len(res["closest_captions"]) == 2


def test_cli_explain_image_without_unet(no_unet, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    out = tmp_path / "where"
    assert cli("explain", "image", img, "--text", "red circle", "--out", out, "--model", no_unet) == 2
    line = err_line(capsys)
    assert "unet" in line and str(no_unet) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


# ---------------------------------------------------------------- CLI: explain audit


def audit_json(capsys) -> list[dict]:
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(set(r) == {"words", "ok", "reason", "source"} for r in rows)
    return rows


def test_cli_audit_of_a_render_of_its_own_caption(sd, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    assert cli("explain", "audit", img, "--prompt", rel_scene.caption, "--model", sd, "--json") == 0
    rows = audit_json(capsys)
    checker = [r for r in rows if r["source"] == "checker"]
    assert len(checker) >= 3 and all(r["ok"] is True for r in checker), checker
    assert [r["source"] for r in rows].count("attention") == 1  # a relation prompt and a UNet


def test_cli_audit_of_a_wrong_prompt(sd, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    colour = next(o.color for o in rel_scene.objects)
    other = next(c for c in ("red", "blue", "yellow") if c not in {o.color for o in rel_scene.objects})
    assert f" {colour} " in f" {rel_scene.caption} "
    wrong = f" {rel_scene.caption} ".replace(f" {colour} ", f" {other} ").strip()
    assert cli("explain", "audit", img, "--prompt", wrong, "--model", sd, "--json", "--no-attention") == 0
    rows = audit_json(capsys)
    assert all(r["source"] == "checker" for r in rows)
    failed = [r for r in rows if r["ok"] is False]
    assert failed and all(r["reason"] for r in failed)
    assert any(other in r["words"] and colour in r["reason"] for r in failed), rows
    # the plain-text form marks it too
    assert cli("explain", "audit", img, "--prompt", wrong, "--model", sd, "--no-attention") == 0
    assert "FAIL" in capsys.readouterr().out


def test_cli_audit_empty_prompt(sd, rel_scene, tmp_path, capsys):
    img = save_render(rel_scene, tmp_path / "scene.png")
    assert cli("explain", "audit", img, "--prompt", "  ", "--model", sd) == 2
    assert "empty" in err_line(capsys)


# ---------------------------------------------------------------- CLI: generate --neighbours / --index


def test_cli_generate_neighbours(clip_kit, tmp_path, capsys):
    out = tmp_path / "n.png"
    assert cli("generate", "a red circle", "--model", clip_kit["model"], "--out", out, "--steps", 2,
               "--neighbours", 2, "--index", clip_kit["index"]) == 0
    lines = capsys.readouterr().out.splitlines()
    nov = [ln for ln in lines if "novelty" in ln]
    assert len(nov) == 1 and nov[0].startswith(f"{out}: novelty ")
    assert 0.0 <= float(nov[0].split("novelty ")[1].split()[0]) <= 2.0
    i = lines.index(nov[0])
    assert len(lines[i + 1:i + 3]) == 2 and all(ln.startswith("  ") for ln in lines[i + 1:i + 3])
    assert out.is_file()


@pytest.mark.parametrize("args, words", [
    (["--neighbours", 2], "--index"),
    (["--index", "IX"], "--neighbours"),
    (["--neighbours", -1, "--index", "IX"], "--neighbours"),
])
def test_cli_generate_neighbours_usage_errors(clip_kit, tmp_path, capsys, args, words):
    args = [clip_kit["index"] if a == "IX" else a for a in args]
    out = tmp_path / "o"
    assert cli("generate", "a red circle", "--model", clip_kit["model"], "--out", out, "--steps", 2, *args) == 2
    assert words in err_line(capsys)
    assert not out.exists()


def test_cli_generate_neighbours_needs_a_clip(sd, clip_kit, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli("generate", "a red circle", "--model", sd, "--out", out, "--steps", 2, "--neighbours", 2,
               "--index", clip_kit["index"]) == 2
    assert "CLIP" in err_line(capsys)
    assert not out.exists()
