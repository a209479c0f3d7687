"""Training-recipe options: timestep sampling, the prompt in the time embedding, and the counterfactual
sensitivity measure the recipe study tracks."""

import random

import pytest
import torch

from sfumato.clip import edit_caption
from sfumato.config import apply_overrides, get_preset
from sfumato.diffusion import LatentBatches
from sfumato.errors import UsageError
from sfumato.models import build_train_scheduler, build_unet


def _batches(*overrides):
    cfg = apply_overrides(get_preset("tiny"), list(overrides))
    sched = build_train_scheduler(cfg)
    z = torch.zeros(4, 4, 8, 8)
    return LatentBatches(cfg, sched, (z, z), (torch.zeros(1, 24, 32), torch.zeros(4, dtype=torch.long),
                                              torch.zeros(1, 24, 32)), 1.0)


def test_uniform_timesteps_cover_the_range():
    t = _batches().timesteps(4000, torch.Generator().manual_seed(0)).float()
    assert 450 < t.mean() < 550 and t.min() < 20 and t.max() > 980


def test_logit_normal_with_positive_mean_spends_more_on_high_noise():
    t = _batches("unet.timestep_sampling=logit_normal", "unet.logit_mean=1.0").timesteps(
        4000, torch.Generator().manual_seed(0)).float()
    assert t.mean() > 650 and (t >= 700).float().mean() > 0.45
    assert 0 <= t.min() and t.max() <= 999


def test_uniform_share_gives_low_noise_back_to_a_high_noise_sampler():
    draw = lambda *o: _batches("unet.timestep_sampling=logit_normal", "unet.logit_mean=0.5", *o).timesteps(
        8000, torch.Generator().manual_seed(0)).float()
    lean, mixed = draw(), draw("unet.uniform_share=0.5")
    low = lambda t: (t < 200).float().mean()
    assert low(lean) < 0.05 and 0.09 < low(mixed) < 0.15  # 3 % -> about 0.5 x 3 % + 0.5 x 20 %
    assert (mixed >= 700).float().mean() > 0.3 and 0 <= mixed.min() and mixed.max() <= 999


def test_unknown_timestep_sampling_is_refused():
    cfg = apply_overrides(get_preset("tiny"), ["unet.timestep_sampling=sometimes"])
    with pytest.raises(ValueError, match="timestep_sampling"):
        build_train_scheduler(cfg)


def test_text_time_embedding_makes_the_pooled_prompt_change_the_output():
    cfg = apply_overrides(get_preset("tiny"), ["unet.text_time_embedding=True"])
    unet = build_unet(cfg, 8, 32).eval()
    assert unet.config.addition_embed_type == "text"
    # With cross-attention removed from the picture (zeroed output projections), only the time
    # embedding can carry the prompt: two prompts must still give different predictions.
    for name, p in unet.named_parameters():
        if "attn2.to_out" in name:
            p.data.zero_()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    a = unet(x, t, encoder_hidden_states=torch.randn(1, 24, 32)).sample
    b = unet(x, t, encoder_hidden_states=torch.randn(1, 24, 32)).sample
    assert not torch.allclose(a, b)


def test_config_refuses_a_wrong_type_for_the_new_keys():
    with pytest.raises(UsageError, match="text_time_embedding"):
        apply_overrides(get_preset("tiny"), ["unet.text_time_embedding=3"])


def test_shape_edit_names_a_shape_the_caption_does_not():
    rng = random.Random(0)
    for caption in ("a red circle", "a square and a big cross on a white background", "two blue crosses"):
        edited = edit_caption(caption, "shape", rng)
        assert edited != caption and edited is not None
    assert edit_caption("the digit 3 in red", "shape", rng) is None
    assert edit_caption("a circle and a square", "shape", rng) in {"a circle and a triangle", "a circle and a cross"}


def test_more_hard_negatives_per_caption_and_shape_edits():
    from sfumato.clip import ALL_EDIT_KINDS, batch_negatives, hard_negative, hard_negatives

    caps = ["a red circle to the left of a blue square", "three purple circles", "the digit 7 in red"]
    # one per caption with the default kinds: the same edits, in the same order, as before
    a, b = random.Random(3), random.Random(3)
    assert batch_negatives(caps, a) == [e for c in caps if (e := hard_negative(c, b))]
    three = hard_negatives(caps[0], random.Random(0), 3, ALL_EDIT_KINDS)
    assert len(three) == len(set(three)) == 3 and caps[0] not in three
    shapes = {e for seed in range(20) for e in hard_negatives(caps[1], random.Random(seed), 1, ("shape",))}
    assert shapes and all(e.startswith("three purple ") and "circles" not in e for e in shapes)
    assert len(batch_negatives(caps, random.Random(0), 2, ALL_EDIT_KINDS)) <= 6


def test_clip_negative_kinds_are_checked():
    from sfumato.config import validate

    validate(apply_overrides(get_preset("tiny"), ["clip.negatives=3", "clip.negative_kinds=('shape','color')"]))
    with pytest.raises(UsageError, match="negative_kinds.*'hue'"):
        validate(apply_overrides(get_preset("tiny"), ["clip.negative_kinds=('hue',)"]))
    with pytest.raises(UsageError, match="clip.negatives"):
        validate(apply_overrides(get_preset("tiny"), ["clip.negatives=0"]))


def test_counterfactual_sensitivity_of_the_shipped_model():
    """The shipped UNet reads the shape word (measured +16-25 % x0 error at t = 700 when it is changed)."""
    from sfumato.evaluate import COUNTERFACTUAL_EDITS, counterfactual_sensitivity
    from sfumato.pipeline import load

    from diffusers import DDPMScheduler

    torch.set_num_threads(1)
    pipe = load()
    sched = DDPMScheduler.from_config(pipe.scheduler_config)
    out = counterfactual_sensitivity(pipe.unet, sched, pipe.vae, pipe.tokenizer, pipe.text_encoder, n=24,
                                     timesteps=(700,))
    assert set(out) == {f"cf_{k}_t700" for k in COUNTERFACTUAL_EDITS}
    assert out["cf_color_t700"] > 0.05


def _grown(tmp_path, *overrides):
    """A plain tiny UNet, saved, and a UNet of the tiny preset with `overrides` grown from it."""
    from sfumato.stages import load_unet_weights

    torch.manual_seed(0)
    plain = build_unet(get_preset("tiny"), 8, 32).eval()
    plain.save_pretrained(tmp_path / "unet")
    grown = build_unet(apply_overrides(get_preset("tiny"), list(overrides)), 8, 32).eval()
    load_unet_weights(grown, tmp_path / "unet")
    return plain, grown


def test_unet_init_grows_the_text_time_embedding_without_changing_the_output(tmp_path):
    from sfumato.stages import load_unet_weights

    plain, grown = _grown(tmp_path, "unet.text_time_embedding=True")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.randn(2, 24, 32)
    assert torch.allclose(plain(x, t, encoder_hidden_states=ctx).sample, grown(x, t, encoder_hidden_states=ctx).sample,
                          atol=1e-6)
    # ... but not the reverse, and not another width
    with pytest.raises(UsageError, match="another architecture"):
        grown.save_pretrained(tmp_path / "grown")
        load_unet_weights(build_unet(get_preset("tiny"), 8, 32), tmp_path / "grown")


def test_unet_init_grows_a_second_transformer_block_without_changing_the_output(tmp_path):
    from diffusers import UNet2DConditionModel

    from sfumato.stages import load_unet_weights

    plain, deep = _grown(tmp_path, "unet.transformer_layers=2")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.randn(2, 24, 32)
    assert torch.allclose(plain(x, t, encoder_hidden_states=ctx).sample, deep(x, t, encoder_hidden_states=ctx).sample,
                          atol=1e-6)
    # the new block's residual outputs start at zero but receive gradients, so it can learn
    deep.train()
    deep(x, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    out = deep.down_blocks[1].attentions[0].transformer_blocks[1].attn2.to_out[0]
    assert not out.weight.abs().any() and out.weight.grad.abs().sum() > 0
    # a plain diffusers UNet loads the grown folder as it is
    deep.save_pretrained(tmp_path / "deep")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "deep")
    assert again.config.transformer_layers_per_block == 2
    # and a UNet with one block per layer cannot start from it
    with pytest.raises(UsageError, match="another architecture"):
        load_unet_weights(build_unet(get_preset("tiny"), 8, 32), tmp_path / "deep")


def test_position_input_gives_each_cell_its_own_constant_and_grows_from_a_plain_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    from sfumato.stages import load_unet_weights

    plain, pos = _grown(tmp_path, "unet.position_input=True")
    assert pos.config.center_input_sample and pos.config.conv_in_kernel == 9
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        # the saved conv_in sits in the middle, halved for the doubled input, its bias taking back the shift
        w = pos.conv_in.weight
        assert torch.allclose(w[..., 3:6, 3:6], plain.conv_in.weight / 2)
        middle = torch.nn.Conv2d(4, w.shape[0], 9, padding=4)
        middle.weight.zero_()
        middle.weight[..., 3:6, 3:6] = w[..., 3:6, 3:6]
        middle.bias.copy_(pos.conv_in.bias)
        a, b = plain.conv_in(x), middle(2 * x - 1)
        assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)  # the same but at the border
        # the outer taps start as faint ramps: an all-zero latent gives every cell a value of its own
        lit = pos.conv_in(2 * torch.zeros(1, 4, 8, 8) - 1)[0, 0].flatten()
    assert len(set(lit.round(decimals=5).tolist())) == 64
    inner = w[..., 3:6, 3:6]
    outer = (w.abs().sum() - inner.abs().sum()) / (w.numel() - inner.numel())
    assert outer < 0.3 * inner.abs().mean()  # faint, tap for tap
    pos.save_pretrained(tmp_path / "pos")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "pos")  # plain diffusers keys
    assert again.config.conv_in_kernel == 9 and again.config.center_input_sample
    load_unet_weights(build_unet(apply_overrides(get_preset("tiny"), ["unet.position_input=True"]), 8, 32),
                      tmp_path / "pos")  # and it trains on from itself
    with pytest.raises(UsageError, match="another architecture"):
        load_unet_weights(build_unet(get_preset("tiny"), 8, 32), tmp_path / "pos")


def test_unet_loss_draws_pairs_by_their_weights(monkeypatch):
    import numpy as np

    import sfumato.diffusion as diffusion

    b = _batches()
    seen = []
    real = b.draw
    monkeypatch.setattr(b, "draw", lambda idx, g, device, **kw: seen.extend(idx.tolist()) or real(idx, g, device, **kw))
    model = lambda x, t, encoder_hidden_states: type("Out", (), {"sample": torch.zeros_like(x)})()  # noqa: E731
    train_idx = np.array([0, 1, 2, 3])
    for i in range(5):
        diffusion.unet_loss(model, b, train_idx, torch.Generator().manual_seed(i), "cpu",
                            weights=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert set(seen) == {2}


def test_bidirectional_tower_keeps_the_weights_and_lets_early_tokens_read_later_ones(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from sfumato.models import bidirectional_text_encoder, load_text_encoder

    torch.manual_seed(0)
    causal = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=8, hidden_act="gelu")).eval()
    both = bidirectional_text_encoder(causal).eval()
    ids = torch.tensor([[3, 7, 9, 11, 2, 2, 2, 2]])
    later = ids.clone()
    later[0, 2] = 20  # a later word changed
    with torch.no_grad():
        # one token has nothing to look ahead to: the copied weights give the causal tower's state
        assert torch.allclose(both(ids[:, :1])[0], causal(ids[:, :1])[0], atol=1e-5)
        assert torch.equal(causal(ids)[0][0, 0], causal(later)[0][0, 0])  # causal: the first token cannot see it
        assert not torch.allclose(both(ids)[0][0, 0], both(later)[0][0, 0])  # bidirectional: it does
    both.save_pretrained(tmp_path / "te")
    back = load_text_encoder(tmp_path / "te").eval()
    assert type(back).__name__ == "MegatronBertModel"
    with torch.no_grad():
        assert torch.equal(back(ids)[0], both(ids)[0])


def test_bidirectional_tower_needs_a_tower_learning_rate():
    with pytest.raises(UsageError, match="text_encoder_lr"):
        from sfumato.config import validate

        validate(apply_overrides(get_preset("tiny"), ["unet.text_bidirectional=True"]))


def test_other_relations_name_the_opposite_side_and_both_sides_of_the_other_axis():
    from sfumato.clip import other_relations

    got = other_relations("a red circle over a blue square on a white background")
    assert got == ["a red circle to the left of a blue square on a white background",
                   "a red circle to the right of a blue square on a white background",
                   "a red circle below a blue square on a white background"]
    assert other_relations("a red circle and a blue square") == []


def test_relation_contrast_denoises_relation_pairs_again_under_another_relation():
    import numpy as np
    from transformers import CLIPTokenizer

    from sfumato.diffusion import caption_ids, relation_negatives, unet_loss
    from sfumato.pipeline import DEFAULT_MODEL

    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    captions = ["a red circle left of a blue square", "a green cross", "a red circle left of a blue square",
                "a yellow cross below a red square"]
    text, neg = relation_negatives(tok, captions, caption_ids(tok, captions))
    table = text[0]
    assert neg.shape == (4, 3) and (neg[1] == -1).all() and torch.equal(neg[0], neg[2])
    decoded = tok.batch_decode(table[neg[3]], skip_special_tokens=True)
    assert decoded == ["a yellow cross to the left of a red square", "a yellow cross to the right of a red square",
                       "a yellow cross above a red square"]

    # states instead of ids (a frozen tower): one row per relation caption, and the loss term runs
    cfg = apply_overrides(get_preset("tiny"), ["unet.relation_contrast=1.0", "unet.contrast_min_t=0",
                                               "unet.caption_dropout=0", "unet.batch_size=8"])
    states = torch.randn(len(table), table.shape[1], 32)
    z = torch.randn(4, 4, 8, 8)
    batches = LatentBatches(cfg, build_train_scheduler(cfg), (z, torch.zeros_like(z)),
                            (states, text[1], torch.zeros(1, table.shape[1], 32)), 1.0, negatives=neg)
    unet = build_unet(cfg, 8, 32)
    loss, logs = unet_loss(unet, batches, np.arange(4), torch.Generator().manual_seed(0), "cpu")
    assert "contrast" in logs and float(logs["contrast"]) >= 0
    loss.backward()  # the term reaches the UNet's weights
    cfg.unet.relation_contrast = 0.0
    _, logs = unet_loss(unet, batches, np.arange(4), torch.Generator().manual_seed(0), "cpu")
    assert "contrast" not in logs
