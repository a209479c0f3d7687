"""Per-token cross-attention maps from a diffusers UNet, aggregated DAAM-style.

    with capture_cross_attention(unet, height, width) as store:
        ... run the UNet (any number of steps, CFG batches allowed) ...
    maps = store.maps()        # (B, T, H, W): attention to each token, summed over heads, layers, steps

`finest=True` keeps only the layers at the finest resolution that has cross-attention: in the
small ShapesWorld UNet the coarser (4x4) layers spread over the whole image, and summing them in
halved the pointing game on held-out scenes (benchmarks/bench_explain.py).

diffusers' own processors compute attention with a fused kernel that never exposes the
probabilities, so the cross-attention layers (`attn2`) get a processor written here after
diffusers' `AttnProcessor` that also keeps them; self-attention keeps its fast processor.
DAAM: https://arxiv.org/abs/2210.04885 (upsample each layer's map to the image, sum).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class AttentionStore:
    """Running sum of upsampled cross-attention probabilities of the conditional batch."""

    def __init__(self, height: int, width: int, cfg: bool = False, finest: bool = False):
        self.height, self.width, self.cfg, self.finest = height, width, cfg, finest
        self.total: torch.Tensor | None = None
        self.calls = 0
        self.grid = 0  # with `finest`: the positions (H*W) of the finest layer seen so far

    def add(self, probs: torch.Tensor, batch: int, heads: int) -> None:
        """probs: (batch * heads, H*W, T) from one cross-attention layer at one step."""
        hw, t = probs.shape[1], probs.shape[2]
        if self.finest:
            if hw < self.grid:
                return
            if hw > self.grid:  # a finer layer than any before: what was summed so far is coarser
                self.total, self.calls, self.grid = None, 0, hw
        p = probs.reshape(batch, heads, hw, t).sum(1)  # heads summed
        if self.cfg:
            p = p[batch // 2:]  # [uncond, cond] under classifier-free guidance
        # The layer's grid has the image's aspect ratio at some down-sampling.
        scale = math.sqrt(self.height * self.width / hw)
        h, w = round(self.height / scale), round(self.width / scale)
        grid = p.permute(0, 2, 1).reshape(p.shape[0], t, h, w)
        up = F.interpolate(grid.float(), size=(self.height, self.width), mode="bilinear", align_corners=False)
        self.total = up if self.total is None else self.total + up
        self.calls += 1

    def reset(self) -> None:
        """Forget what was recorded (layout search keeps only its last step)."""
        self.total, self.calls, self.grid = None, 0, 0

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded (does this UNet have cross-attention layers?)")
        return self.total / self.calls


class _StoringProcessor:
    """diffusers' AttnProcessor (attention_processor.py), plus a hand-off of the probabilities."""

    def __init__(self, store, keep_grad: bool = False):
        self.store, self.keep_grad = store, keep_grad

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:
            self.store.add(probs if self.keep_grad else probs.detach(), batch_size, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def swap_cross_attention_processors(unet, store, keep_grad: bool = False):
    """Hand every cross-attention layer's probabilities to `store.add(probs, batch, heads)` while
    the block runs (with their gradients when `keep_grad`)."""
    before = unet.attn_processors
    if not any(name.endswith("attn2.processor") for name in before):
        raise ValueError("this UNet has no cross-attention layers to read maps from")
    unet.set_attn_processor({name: _StoringProcessor(store, keep_grad) if name.endswith("attn2.processor") else proc
                             for name, proc in before.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(before)


@contextlib.contextmanager
def capture_cross_attention(unet, height: int, width: int, cfg: bool = False, finest: bool = False):
    """Record cross-attention while the block runs; `cfg`: batches are [uncond, cond], keep cond;
    `finest`: only the layers at the finest resolution."""
    with swap_cross_attention_processors(unet, AttentionStore(height, width, cfg, finest)) as store:
        yield store


def word_token_spans(tokenizer, text: str) -> list[tuple[str, list[int]]]:
    """Each word of `text` with the positions of its tokens in the encoded prompt (after the start
    token). CLIP's tokenizer splits words on its own (BPE per pre-token), so word by word encoding
    lines up with the whole; words past the context are left out."""
    out, pos = [], 1
    limit = tokenizer.model_max_length - 1  # the end token takes the last slot
    for word in text.split():
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        if n == 0:
            continue
        span = [p for p in range(pos, pos + n) if p < limit]
        if span:
            out.append((word, span))
        pos += n
    return out


def normalise(m: torch.Tensor) -> torch.Tensor:
    """Scale a (..., H, W) map to [0, 1] per map."""
    lo = m.flatten(-2).min(-1).values[..., None, None]
    hi = m.flatten(-2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-8)
