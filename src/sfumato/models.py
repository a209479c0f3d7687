"""Builders for the three models from one TrainCfg, on diffusers and transformers classes.

The towers are not re-implemented: CLIPModel, CLIPTextModel, AutoencoderKL, UNet2DConditionModel
and the diffusers schedulers are used as they are; this module only sizes them.
"""

from __future__ import annotations

import math

from .config import TrainCfg
from .errors import UsageError


def quiet_libraries() -> None:
    """Our own progress bars and messages say what happens; the libraries' per-file chatter is noise."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


def _groups(channels, min_per_group: int = 4) -> int:
    """GroupNorm group count: the most (<= 32) that divide every width with at least `min_per_group`
    channels each, as Stable Diffusion's 32 groups of 4+ channels. One channel per group normalises
    away each feature map's mean, the flat colours ShapesWorld is made of; measured on the tiny VAE,
    one per group left the loss at 0.96 after 60 steps where four per group reached 0.23."""
    g = math.gcd(*channels)
    ok = [d for d in range(1, min(32, g) + 1) if g % d == 0 and min(channels) // d >= min_per_group]
    return max(ok or [1])


def build_clip(cfg: TrainCfg, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    c = cfg.clip
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=c.text_width, intermediate_size=4 * c.text_width,
        num_hidden_layers=c.text_layers, num_attention_heads=c.heads, projection_dim=c.embed_dim,
        max_position_embeddings=cfg.tokenizer.context_length, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, hidden_act="gelu",
    )
    vision = CLIPVisionConfig(
        image_size=cfg.data.res, patch_size=c.patch_size, hidden_size=c.vision_width,
        intermediate_size=4 * c.vision_width, num_hidden_layers=c.vision_layers, num_attention_heads=c.heads,
        projection_dim=c.embed_dim, hidden_act="gelu",
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=c.embed_dim)
    return CLIPModel(config)


def text_encoder_from_clip(clip):
    """The text tower of a CLIPModel as a standalone CLIPTextModel (what diffusers pipelines load)."""
    from transformers import CLIPTextModel

    enc = CLIPTextModel(clip.config.text_config)
    getattr(enc, "text_model", enc).load_state_dict(clip.text_model.state_dict())  # v4 nests, v5 does not
    return enc


def bidirectional_text_encoder(text_encoder):
    """The same text tower with its causal mask lifted, so every token reads the whole prompt (a
    tower that is bidirectional already, e.g. one trained on from such a run, is returned as it is).

    In a causal tower the first-named object's tokens never see the relation that follows them ("a red
    circle | to the left of a blue square"), so only later tokens can tell the UNet where it goes.
    transformers' MegatronBertModel is a bidirectional pre-LayerNorm transformer laid out as CLIP's text
    transformer (learned positions, LayerNorm before attention and MLP, a final LayerNorm), so the
    weights copy one to one; no library converts one into the other, hence this function. Plain
    diffusers loads it as a pipeline's `text_encoder` (it reads output [0]); every prompt is padded to
    the tokenizer's full length, in training and in diffusers alike, so the padding it reads is the same."""
    import torch
    from transformers import MegatronBertConfig, MegatronBertModel

    c = text_encoder.config
    if c.model_type != "clip_text_model":
        return text_encoder
    config = MegatronBertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=1, layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=c.pad_token_id,
    )
    enc = MegatronBertModel(config)  # its pooler is unused, kept so the folder loads without gaps
    src = getattr(text_encoder, "text_model", text_encoder).state_dict()  # v4 nests, v5 does not
    dst = {"embeddings.word_embeddings.weight": src["embeddings.token_embedding.weight"],
           "embeddings.position_embeddings.weight": src["embeddings.position_embedding.weight"],
           "embeddings.token_type_embeddings.weight": torch.zeros(1, c.hidden_size),
           "encoder.ln.weight": src["final_layer_norm.weight"], "encoder.ln.bias": src["final_layer_norm.bias"]}
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "layer_norm1": "attention.ln", "layer_norm2": "ln", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
    for i in range(c.num_hidden_layers):
        for a, b in names.items():
            for p in ("weight", "bias"):
                dst[f"encoder.layer.{i}.{b}.{p}"] = src[f"encoder.layers.{i}.{a}.{p}"]
    missing, unexpected = enc.load_state_dict(dst, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"CLIP text tower to MegatronBert: missing {missing}, unexpected {unexpected}")
    return enc


def load_text_encoder(folder, **kwargs):
    """A model folder's text tower, of whichever transformers class its config names (CLIPTextModel,
    or the bidirectional MegatronBertModel above)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, **kwargs)


def build_vae(cfg: TrainCfg):
    from diffusers import AutoencoderKL

    v = cfg.vae
    n = len(v.channels)
    if v.norm_groups and any(c % v.norm_groups for c in v.channels):
        raise UsageError(f"vae.norm_groups={v.norm_groups} must divide every vae.channels width {tuple(v.channels)}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(v.channels),
        layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
        norm_num_groups=v.norm_groups or _groups(v.channels), sample_size=cfg.data.res,
    )


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(cfg: TrainCfg, latent_res: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    if len(u.attention_levels) != len(u.channels):
        raise ValueError("unet.attention_levels needs one entry per unet.channels entry")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_res, in_channels=cfg.vae.latent_channels, out_channels=cfg.vae.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(u.channels),
        layers_per_block=u.layers_per_block, cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=u.transformer_layers,
        # diffusers reads `attention_head_dim` as the number of heads per block.
        attention_head_dim=tuple(max(1, ch // u.head_dim) for ch in u.channels),
        norm_num_groups=_groups(u.channels),
        **({"center_input_sample": True, "conv_in_kernel": position_kernel(latent_res)} if u.position_input else {}),
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": max(1, cross_attention_dim // u.head_dim)}
           if u.text_time_embedding else {}),
    )


def position_kernel(latent_res: int) -> int:
    """The smallest odd conv_in kernel whose padding reaches past the middle of the latent: every
    cell then has padded taps on some side, at a distance that is its own."""
    return 2 * (latent_res // 2) + 1


def build_train_scheduler(cfg: TrainCfg):
    from diffusers import DDPMScheduler

    u = cfg.unet
    if u.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unet.prediction_type must be epsilon or v_prediction, got {u.prediction_type!r}")
    if u.zero_terminal_snr and u.prediction_type == "epsilon":
        raise ValueError("unet.zero_terminal_snr needs prediction_type v_prediction (epsilon is undefined at SNR 0)")
    if u.timestep_sampling not in ("uniform", "logit_normal", "mode"):
        raise ValueError(f"unet.timestep_sampling must be uniform, logit_normal or mode, got {u.timestep_sampling!r}")
    return DDPMScheduler(
        num_train_timesteps=u.train_timesteps, beta_schedule=u.beta_schedule, prediction_type=u.prediction_type,
        rescale_betas_zero_snr=u.zero_terminal_snr, timestep_spacing="trailing", clip_sample=False, steps_offset=1,
    )


def build_sample_scheduler(train_scheduler):
    """The default sampler saved with a model: DPM-Solver++ (2M) on the training noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++",
                                                   solver_order=2, final_sigmas_type="zero")
