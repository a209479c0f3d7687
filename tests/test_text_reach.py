"""The relation's reach into the text states after it, and a tower fitted to carry it."""

from __future__ import annotations

import pytest
import torch
from test_generate import build_tiny_sd

from sfumato.evaluate import evaluation_prompts
from sfumato.sampling import prompt_ids
from sfumato.shapesworld.checker import parse_prompt
from sfumato.text_reach import after_relation, fit_reach, flipped_relation, reach


def test_a_flipped_relation_names_the_other_side_in_the_same_words():
    assert flipped_relation("a red cross under a blue square") == "a red cross over a blue square"
    assert flipped_relation("a blue triangle on the right of a red circle") == "a blue triangle on the left of a red circle"
    assert flipped_relation("a green square on top of a red cross") == "a green square beneath a red cross"
    assert flipped_relation("a red circle left of a blue square") == "a red circle right of a blue square"
    assert flipped_relation("two red circles") is None
    flipped_any = 0
    for _, prompt in evaluation_prompts(10, 0):
        flipped = flipped_relation(prompt)
        if flipped is not None:
            flipped_any += 1
            assert parse_prompt(flipped).relation != parse_prompt(prompt).relation
            assert flipped_relation(flipped) == prompt
    assert flipped_any >= 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import sfumato

    return sfumato.load(build_tiny_sd(tmp_path_factory.mktemp("reach") / "model"), onnx=False)


def test_the_words_after_the_relation_are_lined_up_across_phrases_of_other_lengths(tiny):
    tok = tiny.tokenizer
    a, b = "a green square on top of a red cross", "a green square beneath a red cross"
    ids = prompt_ids(tok, [a, b])
    pa, pb = after_relation(ids[0], ids[1], tok.eos_token_id)
    assert len(pa) == len(pb) == len(tok("a red cross").input_ids) - 1  # "a red cross" and the end token
    assert torch.equal(ids[0, pa], ids[1, pb]) and ids[0, pa[-1]] == tok.eos_token_id


def test_a_fitted_tower_carries_the_relation_and_keeps_the_other_states(tiny):
    prompts = ["a red circle to the left of a blue square", "a green cross over a red square"]
    before = reach(tiny.tokenizer, tiny.text_encoder, prompts).mean().item()
    tower, log = fit_reach(tiny.tokenizer, tiny.text_encoder, steps=40, target=0.5, keep=1.0, lr=3e-3, batch=16,
                           progress=False)
    after = reach(tiny.tokenizer, tower, prompts).mean().item()
    assert after > before + 0.1 and log[-1]["short"] < log[0]["short"]
    assert log[-1]["drift"] < 0.1  # the other states stay near the old tower's
    ids = prompt_ids(tiny.tokenizer, ["a red circle"])
    old, new = tiny.text_encoder(ids)[0], tower(ids)[0]
    assert ((new - old).norm() / old.norm()).item() < 0.5
    assert reach(tiny.tokenizer, tower, ["two red circles"]).numel() == 0
