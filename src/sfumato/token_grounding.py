"""A training loss that keeps each object word's cross-attention inside its object.

Where the data says where each named object is (ShapesWorld scene records; any data set with boxes
per object could supply the same), the UNet's attention to an object's words (its colour, size and
shape, or a digit's "digit", number and colour) is asked to fall inside that object's box:

    loss = mean over layers and words of (1 - attention mass inside the box / total attention mass)^2

the token loss of TokenCompose (Wang et al., 2024, https://arxiv.org/abs/2312.03626). The diffusion
loss alone barely tells the UNet which side of the image "to the left of" puts each object: the x0
error under a flipped relation differs by under 1 % (docs/recipe.md). This loss asks for it at every
attention layer and every noise level. Only training reads it; sampling and the saved folder are a
plain diffusers UNet. No library offers it, so it is written here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .attention import swap_cross_attention_processors, word_token_spans

MAX_OBJECTS = 4  # one bit per object in a token's assignment
BOX_PX = 64  # scene records give boxes in 64-px coordinates at every resolution (SHAPESWORLD.md)


def object_words(caption: str, record: dict) -> list[tuple[int, int]]:
    """(word index, object bits) for each word of `caption` that names part of an object in
    `record` (a ShapesWorld scene record, objects in caption order). Plurals and counts name every
    object; relations, articles and the background phrase name none."""
    from .shapesworld import spec

    words = caption.split()
    n = len(record["objects"])
    if n == 0 or n > MAX_OBJECTS:
        return []
    # " on a <bg> background" at the end belongs to no object ("on the left of" is a relation)
    end = len(words) - 4 if len(words) >= 4 and words[-1] == "background" and words[-4:-2] == ["on", "a"] else len(words)
    every = (1 << n) - 1
    names_all = set(spec.NUMBERS) | set(spec.PLURALS.values())
    part = set(spec.COLORS) | set(spec.WORD_SIZE) | {"digit"} | {str(d) for d in range(10)}
    out, k = [], 0
    counting = any(w in names_all for w in words[:end])
    for i, w in enumerate(words[:end]):
        if counting and (w in names_all or w in part):
            out.append((i, every))
        elif k < n and (w in part or w in spec.SHAPES):
            out.append((i, 1 << k))
            if w in spec.SHAPES:  # a shape word ends its noun phrase
                k += 1
    return out


def grounding_targets(tokenizer, captions: list[str], records: list[dict], length: int):
    """Per pair: which objects each token position names (N, length) uint8 bits, the objects'
    boxes (N, MAX_OBJECTS, 4) int16 [x0, y0, x1, y1), and the canvas size they are given in."""
    assign = torch.zeros(len(captions), length, dtype=torch.uint8)
    boxes = torch.zeros(len(captions), MAX_OBJECTS, 4, dtype=torch.int16)
    for i, (cap, rec) in enumerate(zip(captions, records)):
        spans = word_token_spans(tokenizer, cap)
        pos = {w: span for w, (_, span) in enumerate(spans)}
        for word, bits in object_words(cap, rec):
            for p in pos.get(word, []):
                if p < length:
                    assign[i, p] = bits
        for k, obj in enumerate(rec["objects"][:MAX_OBJECTS]):
            boxes[i, k] = torch.tensor(obj["bbox"], dtype=torch.int16)
    return assign, boxes, BOX_PX


def token_masks(assign: torch.Tensor, boxes: torch.Tensor, image_px: int, grid: int) -> torch.Tensor:
    """(B, L, grid, grid): the share of each grid cell covered by the objects each token names."""
    r = torch.arange(image_px)
    b = boxes.long()
    inside = ((r[None, None, None, :] >= b[..., 0, None, None]) & (r[None, None, None, :] < b[..., 2, None, None])
              & (r[None, None, :, None] >= b[..., 1, None, None]) & (r[None, None, :, None] < b[..., 3, None, None]))
    cover = F.adaptive_avg_pool2d(inside.float().flatten(0, 1)[:, None], grid).view(*b.shape[:2], grid, grid)
    bits = torch.stack([(assign.long() >> k) & 1 for k in range(b.shape[1])], -1).float()  # (B, L, K)
    return torch.einsum("blk,bkhw->blhw", bits, cover).clamp(max=1.0)


class _ProbsList:
    """An AttentionStore stand-in that keeps each cross-attention layer's probabilities, with
    their gradients, as (batch, heads, H*W, T)."""

    def __init__(self):
        self.probs: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor, batch: int, heads: int) -> None:
        self.probs.append(probs.reshape(batch, heads, *probs.shape[1:]))


@contextlib.contextmanager
def recording_attention(unet):
    """Keep every cross-attention layer's probabilities (with gradients) while the block runs."""
    store = _ProbsList()
    with swap_cross_attention_processors(unet, store, keep_grad=True):
        yield store


def grounding_loss(probs: list[torch.Tensor], assign: torch.Tensor, boxes: torch.Tensor, image_px: int,
                   keep: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss over the recorded layers; `keep` (B,) bool drops pairs whose
    caption was replaced by the empty prompt (or whose noise level the loss skips).
    Zero when no token names an object."""
    named = (assign > 0) & keep[:, None].to(assign.device)
    if not named.any():
        return torch.zeros(())
    masks = {}
    losses = []
    for p in probs:
        hw = p.shape[2]
        grid = int(round(hw ** 0.5))
        if grid not in masks:
            masks[grid] = token_masks(assign, boxes, image_px, grid).flatten(2).transpose(1, 2).to(p.device)
        a = p.float().mean(1)  # (B, HW, T), heads averaged
        m = masks[grid][..., : a.shape[-1]]
        inside = (a * m).sum(1) / a.sum(1).clamp_min(1e-8)  # (B, T)
        losses.append(((1 - inside) ** 2)[named[:, : a.shape[-1]]].mean())
    return torch.stack(losses).mean()


__all__ = ["object_words", "grounding_targets", "token_masks", "recording_attention", "grounding_loss"]
