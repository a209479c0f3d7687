"""The token-grounding loss: which words name which object, the boxes as masks, and the loss itself."""

import numpy as np
import pytest
import torch

from sfumato.config import apply_overrides, get_preset
from sfumato.diffusion import LatentBatches, unet_loss
from sfumato.models import build_train_scheduler, build_unet
from sfumato.token_grounding import grounding_loss, object_words, recording_attention, token_masks


def _record(*boxes):
    return {"objects": [{"bbox": list(b)} for b in boxes]}


def _named(caption, record):
    words = caption.split()
    return [(words[i], bits) for i, bits in object_words(caption, record)]


def test_each_noun_phrase_names_its_own_object_and_relations_name_none():
    rec = _record((0, 0, 12, 12), (30, 0, 42, 12))
    assert _named("a tiny red circle to the left of a blue square on a white background", rec) == [
        ("tiny", 1), ("red", 1), ("circle", 1), ("blue", 2), ("square", 2)]
    assert _named("a circle and a large cross", rec) == [("circle", 1), ("large", 2), ("cross", 2)]


def test_counts_name_every_object_and_digits_their_glyph():
    three = _record((0, 0, 12, 12), (20, 0, 32, 12), (40, 0, 52, 12))
    assert _named("three green crosses on a black background", three) == [
        ("three", 7), ("green", 7), ("crosses", 7)]
    one = _record((10, 10, 25, 31))
    # the background's colour word is not the digit's
    assert _named("the digit 7 in red on a white background", one) == [("digit", 1), ("7", 1), ("red", 1)]
    assert _named("a blue digit 3", one) == [("blue", 1), ("digit", 1), ("3", 1)]


def test_masks_are_the_share_of_each_cell_a_box_covers():
    assign = torch.zeros(1, 4, dtype=torch.uint8)
    assign[0, 1], assign[0, 2], assign[0, 3] = 1, 2, 3
    boxes = torch.tensor([[[0, 0, 16, 16], [32, 32, 64, 48], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.int16)
    m = token_masks(assign, boxes, 64, 4)  # 16-px cells
    assert m[0, 0].sum() == 0
    assert m[0, 1, 0, 0] == 1 and m[0, 1].sum() == 1
    assert torch.equal(m[0, 2, 2], torch.tensor([0.0, 0.0, 1.0, 1.0])) and m[0, 2].sum() == 2
    assert torch.equal(m[0, 3], (m[0, 1] + m[0, 2]).clamp(max=1))  # both objects: the union


def test_loss_is_zero_inside_the_box_and_grows_with_attention_outside():
    assign = torch.tensor([[0, 1]], dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, 32, 32]] + [[0, 0, 0, 0]] * 3], dtype=torch.int16)
    keep = torch.ones(1, dtype=torch.bool)
    probs = torch.zeros(1, 2, 4, 2)  # (batch, heads, 2x2 positions, tokens)
    probs[..., 0] = 1.0
    probs[:, :, 0, 1] = 1.0  # the named token drawn only at the top-left cell, its object's
    assert grounding_loss([probs], assign, boxes, 64, keep) == pytest.approx(0.0)
    probs[..., 1] = 1.0  # drawn everywhere alike: a quarter inside
    assert grounding_loss([probs], assign, boxes, 64, keep) == pytest.approx(0.75 ** 2)
    # a pair whose caption was dropped for guidance names nothing
    assert grounding_loss([probs], assign, boxes, 64, torch.zeros(1, dtype=torch.bool)) == 0


def _grounded_batches(weight):
    cfg = apply_overrides(get_preset("tiny"), [f"unet.grounding_weight={weight}", "unet.caption_dropout=0",
                                               "unet.batch_size=8"])
    torch.manual_seed(0)
    n, length = 8, 6
    states = torch.randn(n, length, 32)
    assign = torch.zeros(n, length, dtype=torch.uint8)
    assign[:, 2] = 1
    boxes = torch.zeros(n, 4, 4, dtype=torch.int16)
    for i in range(n):  # the object on the left half or the right, as its token's state says
        boxes[i, 0] = torch.tensor([0, 0, 32, 64] if i % 2 else [32, 0, 64, 64])
        states[i, 2] = states[i, 2].abs() * (1 if i % 2 else -1)
    z = torch.randn(n, 4, 8, 8)
    batches = LatentBatches(cfg, build_train_scheduler(cfg), (z, torch.zeros_like(z)),
                            (states, torch.arange(n), torch.zeros(1, length, 32)), 1.0, (assign, boxes, 64))
    return cfg, batches


def test_training_with_the_loss_moves_a_words_attention_into_its_box():
    cfg, batches = _grounded_batches(10.0)
    unet = build_unet(cfg, 8, 32)
    opt = torch.optim.Adam(unet.parameters(), 3e-3)
    idx = np.arange(8)
    losses = []
    for step in range(40):
        loss, logs = unet_loss(unet, batches, idx, torch.Generator().manual_seed(step), "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(logs["grounding"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_grounding_min_t_skips_the_loss_on_steps_below_it():
    cfg, batches = _grounded_batches(1.0)
    unet = build_unet(cfg, 8, 32)

    def grounding_at(t, min_t):
        batches.u.grounding_min_t = min_t
        batches.timesteps = lambda n, g: torch.full((n,), t)
        _, logs = unet_loss(unet, batches, np.arange(8), torch.Generator().manual_seed(0), "cpu")
        return float(logs["grounding"])

    assert grounding_at(100, 500) == 0
    high = grounding_at(900, 0)
    assert high > 0 and grounding_at(900, 500) == pytest.approx(high)


def test_no_grounding_weight_leaves_the_loss_and_processors_alone():
    cfg, batches = _grounded_batches(0.0)
    unet = build_unet(cfg, 8, 32)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    _, logs = unet_loss(unet, batches, np.arange(8), torch.Generator().manual_seed(0), "cpu")
    assert "grounding" not in logs
    with recording_attention(unet) as rec:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 6, 32))
    assert rec.probs and rec.probs[0].requires_grad
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_shapesworld_pairs_carry_records_that_name_objects_in_every_category():
    from transformers import CLIPTokenizer

    from sfumato.config import DataCfg
    from sfumato.data import load_pairs_data
    from sfumato.pipeline import DEFAULT_MODEL
    from sfumato.token_grounding import grounding_targets

    data = load_pairs_data("shapesworld", DataCfg(shapes_n=18), progress=False)
    assert data.records is not None and len(data.records) == len(data.captions)
    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    assign, boxes, px = grounding_targets(tok, data.captions, data.records, tok.model_max_length)
    assert px == 64 and assign.shape == (18, tok.model_max_length)
    assert (assign > 0).any(1).all()  # every caption names at least one object it shows
    for i, rec in enumerate(data.records):
        for k, obj in enumerate(rec["objects"]):
            assert boxes[i, k].tolist() == obj["bbox"]
