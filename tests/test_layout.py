"""Layout search: reading the relation a prompt names, scoring a layout, and choosing the noise.

The choice itself is tested on the tiny random model with the scores replaced (its attention means
nothing); that it pays is tested on the shipped default model."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

import sfumato
from sfumato import layout
from sfumato.cli import main
from sfumato.config import MAX_LAYOUT_SEARCH
from sfumato.errors import UsageError
from sfumato.layout import candidate_seeds, centroid, find_relation, look_ahead, relation_margin
from sfumato.pipeline import DEFAULT_MODEL, GenerationSettings, parse_parameters
from sfumato.shapesworld import spec

from test_generate import build_tiny_sd, same_up_to_rounding

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REL_PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sfumato.load(build_tiny_sd(tmp_path_factory.mktemp("layout") / "tiny-sd"))


# ---------------------------------------------------------------- reading the prompt


@pytest.mark.parametrize("phrase,relation", sorted(spec.WORD_RELATION.items()))
def test_every_shapesworld_relation_is_read_with_both_heads(tokenizer, phrase, relation):
    prompt = f"a small red circle {phrase} a blue square on a black background"
    rel = find_relation(tokenizer, prompt)
    assert rel is not None and rel.relation == relation
    assert (rel.first, rel.second) == ("circle", "square")
    words = dict((w, span) for w, span in sfumato.prompts.tokenize(tokenizer, prompt).words)
    assert list(rel.first_tokens) == words["circle"] and list(rel.second_tokens) == words["square"]


@pytest.mark.parametrize("prompt", ["a red circle", "a red circle and a blue square", "left of a blue square",
                                    "a red circle to the left of", "a red circle left of a square above a cross",
                                    "a red circle, left of a blue square"])
def test_no_single_relation_between_two_objects_is_none(tokenizer, prompt):
    assert find_relation(tokenizer, prompt) is None


def test_prompt_syntax_is_read_as_the_pipeline_encodes_it(tokenizer):
    rel = find_relation(tokenizer, "(a red circle:1.3) above [a blue square]")
    assert rel is not None and (rel.relation, rel.first, rel.second) == ("above", "circle", "square")


# ---------------------------------------------------------------- scoring a layout


def test_margin_sign_follows_the_named_side_and_axis():
    a, b = (10.0, 30.0), (50.0, 30.0)  # a left of b, same row
    assert relation_margin(a, b, "left") == 40 and relation_margin(a, b, "right") == -40
    assert relation_margin(a, b, "above") < 0 and relation_margin(a, b, "below") < 0
    up, down = (30.0, 10.0), (30.0, 50.0)  # y grows downward
    assert relation_margin(up, down, "above") == 40 and relation_margin(up, down, "below") == -40
    # the checker's rule: the named axis has to dominate (|along| >= |across| / 2)
    assert relation_margin((0.0, 0.0), (10.0, 25.0), "left") < 0 < relation_margin((0.0, 0.0), (10.0, 15.0), "left")


def test_centroid_finds_a_blob_over_a_flat_floor():
    m = torch.full((64, 64), 0.2)
    m[40:48, 8:16] += 1.0
    x, y = centroid(m)
    assert abs(x - 11.5) < 0.5 and abs(y - 43.5) < 0.5


def test_margins_prefer_the_candidate_whose_words_lie_as_named(tokenizer):
    rel = find_relation(tokenizer, REL_PROMPT)
    maps = torch.zeros(2, 16, 64, 64)
    (a,), (b,) = rel.first_tokens, rel.second_tokens
    maps[0, a, 28:36, 44:52] = maps[0, b, 28:36, 4:12] = 1  # first object on the right: wrong
    maps[1, a, 28:36, 4:12] = maps[1, b, 28:36, 44:52] = 1  # first object on the left: right
    low, high = layout.margins(maps, rel)
    assert low < 0 < high


def test_candidates_start_with_the_image_seed_and_differ():
    seeds = candidate_seeds(7, 8)
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert candidate_seeds(2**32 - 1, 3)[1] < 2**32
    assert [look_ahead(n) for n in (1, 2, 6, 20)] == [1, 1, 3, 10]


# ---------------------------------------------------------------- choosing the noise


def test_search_draws_the_best_scored_candidate_and_says_which(pipe, monkeypatch):
    chosen = 5
    monkeypatch.setattr(sfumato.pipeline, "margins",
                        lambda maps, rel: [1.0 if i == chosen else 0.0 for i in range(len(maps))])
    img = pipe.generate(GenerationSettings(REL_PROMPT, seed=3, steps=4, layout_search=8))[0]
    info = parse_parameters(img.info["parameters"])
    assert info["Layout search"] == "8" and int(info["Layout seed"]) == candidate_seeds(3, 8)[chosen]
    again = pipe.generate(GenerationSettings(REL_PROMPT, seed=int(info["Layout seed"]), steps=4, layout_search=0))[0]
    assert same_up_to_rounding(img, again)  # the parameters say how to draw it again
    assert "Layout" not in again.info["parameters"]


def test_search_reads_only_the_look_ahead(pipe, monkeypatch):
    calls = []
    real = sfumato.pipeline.denoise
    monkeypatch.setattr(sfumato.pipeline, "denoise", lambda *a, **k: calls.append(k.get("until")) or real(*a, **k))
    pipe.generate(GenerationSettings(REL_PROMPT, seed=0, steps=6, layout_search=8))
    assert calls[0] == 3 and calls[1] is None  # candidates to step 3, then the image itself


@pytest.mark.parametrize("case", ["no relation", "off", "one candidate", "img2img", "default"])
def test_search_is_skipped_where_it_cannot_apply(pipe, case):
    s = GenerationSettings("a red circle and a blue square" if case == "no relation" else REL_PROMPT, seed=2, steps=3,
                           layout_search={"off": 0, "one candidate": 1}.get(case, 8))
    if case == "default":  # opt-in: a plain request draws the seed it names
        s = GenerationSettings(REL_PROMPT, seed=2, steps=3)
    init = Image.new("RGB", (32, 32), (200, 30, 30)) if case == "img2img" else None
    img = pipe.generate(s, init_image=init)[0]
    assert "Layout seed" not in img.info["parameters"]
    if case != "img2img":
        plain = pipe.generate(GenerationSettings(s.prompt, seed=2, steps=3, layout_search=0))[0]
        assert np.array_equal(np.asarray(img), np.asarray(plain))


def test_each_prompt_of_a_batch_is_searched_alone(pipe):
    prompts = ["a red circle", REL_PROMPT, "a blue square above a red circle"]
    images = pipe.generate(GenerationSettings(prompts[0], seed=10, steps=3, layout_search=8), prompts=prompts)
    seeds = [parse_parameters(i.info["parameters"]).get("Layout seed") for i in images]
    assert seeds[0] is None and int(seeds[1]) in candidate_seeds(11, 8) and int(seeds[2]) in candidate_seeds(12, 8)


def test_bad_layout_search_is_named_with_its_limit(pipe, tmp_path, capsys):
    with pytest.raises(UsageError, match=f"--layout-search must be between 0 and {MAX_LAYOUT_SEARCH}"):
        pipe.generate(GenerationSettings(REL_PROMPT, layout_search=MAX_LAYOUT_SEARCH + 1))
    assert main(["generate", REL_PROMPT, "--model", str(pipe.folder), "--layout-search", "-1",
                 "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "--layout-search must be between 0" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- on the shipped model


def test_layout_search_draws_more_position_prompts_right_with_the_shipped_model():
    """The first 20 position prompts of the evaluation at seed 0 (sfumato eval compositional)."""
    from sfumato.evaluate import evaluation_prompts
    from sfumato.shapesworld.checker import judge

    torch.set_num_threads(2)
    pipe = sfumato.load()
    prompts = [(k, p) for k, (c, p) in enumerate(evaluation_prompts(20, 0)) if c == "position"]
    passes = []
    for k_candidates in (0, 8):  # the model's own layouts: its mean prior off
        passes.append(sum(judge(pipe.generate(pipe.settings(p, seed=k, layout_search=k_candidates, mean_prior=0))[0],
                                p).passed for k, p in prompts))
    assert passes[1] >= passes[0] + 4, passes  # at least a fifth of the 20 prompts more (counted: no float sums)


def test_the_shipped_mean_prior_draws_more_position_prompts_right():
    """The same 20 prompts at default settings, with the shipped model's mean prior and without it."""
    from sfumato.evaluate import evaluation_prompts
    from sfumato.shapesworld.checker import judge

    torch.set_num_threads(2)
    pipe = sfumato.load()
    assert pipe.settings("a red circle").mean_prior > 0  # on by default
    prompts = [(k, p) for k, (c, p) in enumerate(evaluation_prompts(20, 0)) if c == "position"]
    passes = [sum(judge(pipe.generate(pipe.settings(p, seed=k, **off))[0], p).passed for k, p in prompts)
              for off in ({"mean_prior": 0}, {})]
    assert passes[1] >= passes[0] + 4, passes
