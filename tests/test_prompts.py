"""AUTOMATIC1111 prompt syntax: parsing, chunking long prompts, weighting token states, and generation with it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sfumato
from sfumato import prompts
from sfumato.cli import main
from sfumato.config import GenerationSettings as S
from sfumato.errors import UsageError
from sfumato.prompts import BREAK, parse, plain, tokenize
from sfumato.sampling import encode_prompts
from test_generate import LONG_PROMPT, build_tiny_sd, flat, one_line

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("prompts") / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return sfumato.load(model_dir, device="cpu")


def weights(text):
    frags, _ = parse(text)
    return [f if f is BREAK else (f[0], round(f[1], 4)) for f in frags]


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,want", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # A1111's own example from parse_prompt_attention
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("a [red] circle", [("a ", 1.0), ("red", 0.9091), (" circle", 1.0)]),
    ("[[red]]", [("red", 0.8264)]),
    ("(a red circle:0.8)", [("a red circle", 0.8)]),
    ("(red: 1.5 )", [("red", 1.5)]),
    ("(red:-0.5)", [("red", -0.5)]),
    ("stray) and ] stay", [("stray) and ] stay", 1.0)]),
    ("ratio 3:2", [("ratio 3:2", 1.0)]),
    ("a red circle BREAK a blue square", [("a red circle", 1.0), BREAK, ("a blue square", 1.0)]),
    ("(a BREAK b:0.5)", [("a", 0.5), BREAK, ("b", 0.5)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", []),
])
def test_parse_like_a1111(text, want):
    assert weights(text) == want


def test_plain_and_notes():
    assert plain(r"a (red:1.3) circle, [blurry] BREAK \(x\)") == "a red circle, blurry (x)"
    assert parse("a (red circle")[1] and "'('" in parse("a (red circle")[1][0]
    assert parse("a [red circle")[1] and "'['" in parse("a [red circle")[1][0]
    assert parse("a (red) circle")[1] == []


# ---------------------------------------------------------------- chunks


def test_short_prompt_is_one_chunk_as_the_tokenizer_pads_it(pipe):
    tok = pipe.tokenizer
    t = tokenize(tok, "a red circle")
    want = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert t.ids == [want] and t.weights == [[1.0] * tok.model_max_length]
    assert [w for w, _ in t.words] == ["a", "red", "circle"]
    assert [p for _, span in t.words for p in span] == list(range(1, len(tok("a red circle").input_ids) - 1))


def test_long_prompt_in_chunks_of_the_context(pipe):
    tok = pipe.tokenizer
    n = tok.model_max_length
    t = tokenize(tok, LONG_PROMPT)
    body = tok(LONG_PROMPT, add_special_tokens=False).input_ids
    assert len(body) > n - 2
    assert len(t.ids) == -(-len(body) // (n - 2)) and all(len(c) == n for c in t.ids)
    # every token of the prompt, in order, once; each chunk framed by start and end tokens
    got = []
    for c in t.ids:
        assert c[0] == tok.bos_token_id
        end = c.index(tok.eos_token_id, 1)
        got += c[1:end]
    assert got == body
    assert [w for w, _ in t.words] == LONG_PROMPT.split()
    assert max(p for _, span in t.words for p in span) >= n  # words of the second chunk are found


def test_break_starts_a_new_chunk(pipe):
    tok = pipe.tokenizer
    t = tokenize(tok, "a red circle BREAK a blue square")
    assert len(t.ids) == 2
    assert t.ids[0] == tokenize(tok, "a red circle").ids[0]
    assert t.ids[1] == tokenize(tok, "a blue square").ids[0]


def test_a_full_chunk_breaks_after_its_last_comma(pipe):
    tok = pipe.tokenizer
    size = tok.model_max_length - 2
    words = ["red"] * (size - 2) + [","] + ["blue", "square", "circle"]
    text = " ".join(words)
    assert len(tok(text, add_special_tokens=False).input_ids) == size + 2
    t = tokenize(tok, text)
    first = t.ids[0][1:t.ids[0].index(tok.eos_token_id, 1)]
    assert tok.decode(first).strip().endswith(",")  # the chunk ends at the comma
    assert tok.decode(t.ids[1][1:t.ids[1].index(tok.eos_token_id, 1)]).split() == ["blue", "square", "circle"]


# ---------------------------------------------------------------- token states


def test_plain_prompts_encode_exactly_as_before(pipe):
    texts = ["a red circle", "two blue squares on a white background", ""]
    z, notes = prompts.encode(pipe.tokenizer, pipe.text_encoder, texts)
    assert torch.equal(z, encode_prompts(pipe.tokenizer, pipe.text_encoder, texts)) and notes == []


def test_weights_scale_token_states_then_restore_the_mean(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    z_plain, _ = prompts.encode(tok, enc, ["a red circle"])
    z, _ = prompts.encode(tok, enc, ["a (red:1.5) circle"])
    t = tokenize(tok, "a (red:1.5) circle")
    w = torch.tensor(t.weights[0])
    red = [p for word, span in t.words if word == "red" for p in span]
    assert w[red].eq(1.5).all() and (w != 1).sum() == len(red)
    want = z_plain * w[None, :, None]
    scale = z_plain.abs().mean()
    if min(z_plain.mean().abs(), want.mean().abs()) >= prompts.MEAN_FLOOR * want.abs().mean():
        want = want * (z_plain.mean() / want.mean())
        assert torch.allclose(z.mean(), z_plain.mean(), atol=1e-6)
    assert torch.allclose(z, want, atol=1e-6)
    assert z.abs().max() <= 1.5 * z_plain.abs().max() + 1e-6 and z.abs().mean() < 2 * scale  # never blown up
    down, _ = prompts.encode(tok, enc, ["a [red] circle"])
    assert not torch.allclose(down, z_plain) and down.abs().mean() < z_plain.abs().mean()


def test_weights_restore_a_mean_that_is_not_near_zero(pipe):
    class Tower(torch.nn.Module):  # states that centre on 1, as CLIP's often do
        device = torch.device("cpu")

        def forward(self, ids):
            return (1.0 + 0.1 * torch.sin(ids[..., None].float() * torch.arange(8.0)),)

    tok = pipe.tokenizer
    z_plain, _ = prompts.encode(tok, Tower(), ["a red circle"])
    z, _ = prompts.encode(tok, Tower(), ["a (red:1.5) circle"])
    assert not torch.allclose(z, z_plain) and torch.allclose(z.mean(), z_plain.mean(), atol=1e-5)


def test_chunks_are_encoded_alone_and_joined(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    n = tok.model_max_length
    z, _ = prompts.encode(tok, enc, ["a red circle BREAK a blue square"])
    a, _ = prompts.encode(tok, enc, ["a red circle"])
    b, _ = prompts.encode(tok, enc, ["a blue square"])
    assert z.shape == (1, 2 * n, a.shape[-1])
    assert torch.allclose(z[:, :n], a, atol=1e-6) and torch.allclose(z[:, n:], b, atol=1e-6)


def test_a_batch_is_padded_with_empty_chunks(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    n = tok.model_max_length
    z, _ = prompts.encode(tok, enc, ["a red circle", LONG_PROMPT, ""])
    k = len(tokenize(tok, LONG_PROMPT).ids)
    assert k >= 2 and z.shape[:2] == (3, k * n)
    empty, _ = prompts.encode(tok, enc, [""])
    single, _ = prompts.encode(tok, enc, ["a red circle"])
    assert torch.allclose(z[0, :n], single[0], atol=1e-6)
    for c in range(1, k):
        assert torch.allclose(z[0, c * n:(c + 1) * n], empty[0], atol=1e-6)


# ---------------------------------------------------------------- generation


def test_weights_change_the_image_and_parameters_keep_the_prompt(pipe):
    written = "a (red:1.6) circle, [blue]"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        img = pipe.generate(S(written, seed=1, steps=3, negative="(gray:1.2)"))[0]
    same = pipe.generate(S("a red circle, blue", seed=1, steps=3, negative="gray"))[0]
    assert not np.array_equal(np.asarray(img), np.asarray(same))
    lines = img.info["parameters"].split("\n")
    assert lines[0] == written and lines[1] == "Negative prompt: (gray:1.2)"


def test_long_prompt_uses_every_word_without_a_warning(pipe):
    tok = pipe.tokenizer
    n = tok.model_max_length
    ids = tok(LONG_PROMPT, add_special_tokens=False).input_ids
    cut = tok.decode(ids[:n - 2])  # what the context alone would have kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        full = pipe.generate(S(LONG_PROMPT, seed=2, steps=3))[0]
    short = pipe.generate(S(cut, seed=2, steps=3))[0]
    assert not np.array_equal(np.asarray(full), np.asarray(short))  # the words past the context count


def test_one_batch_with_prompts_of_different_lengths(pipe):
    texts = ["a red circle", LONG_PROMPT]
    batch = pipe.generate(S("x", seed=4, steps=3), prompts=texts)
    for i, t in enumerate(texts):
        alone = pipe.generate(S(t, seed=4 + i, steps=3))[0]
        d = np.abs(np.asarray(batch[i]).astype(int) - np.asarray(alone).astype(int))
        assert d.max() <= 2, i


def test_cli_unclosed_bracket_is_one_warning_line(model_dir, tmp_path, capsys):
    assert main(["generate", "a (red circle", "--model", str(model_dir), "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    line = one_line(err)
    assert line.startswith("warning: ") and "'('" in line and "Traceback" not in err


def test_cli_refuses_a_wild_weight(model_dir, tmp_path, capsys):
    rc = main(["generate", "a (red:1000) circle", "--model", str(model_dir), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "1000" in one_line(err) and flat("-100 to 100") in flat(err)
    assert not (tmp_path / "o.png").exists()


def test_library_refuses_a_wild_weight_in_the_negative(pipe):
    with pytest.raises(UsageError, match="out of range"):
        pipe.generate(S("a red circle", steps=2, negative="(gray:-500)"))


def test_word_maps_read_the_prompt_as_encoded(pipe):
    from sfumato import explain

    wm = explain.word_maps(pipe, S("a (red:1.3) circle BREAK [blue] square", seed=0, steps=2))
    assert wm.words == ["a", "red", "circle", "blue", "square"]
    assert wm.maps.shape[0] == 5 and np.isfinite(wm.maps).all()
