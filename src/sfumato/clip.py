"""Contrastive text-image training (CLIP) with optional hard negatives, and its retrieval metrics.

The towers are transformers' CLIPModel; this module adds the loss, caption edits that make hard
negatives, and the held-out measurements.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from .shapesworld import spec

COLOR_WORDS = tuple(spec.COLORS)
NUMBER_WORDS = tuple(spec.NUMBERS)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under",
            "under": "over", "beneath": "on top of", "on top of": "beneath"}
_REL = re.compile(r"^(a .+?) (to the left of|to the right of|on the left of|on the right of|left of|right of|"
                  r"above|below|over|under|beneath|on top of) (a .+?)( on a \w+ background)?$")
_COLOR = re.compile(r"\b(" + "|".join(COLOR_WORDS) + r")\b")
_NUMBER = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")
_DIGIT = re.compile(r"\bdigit (\d)\b")

EDIT_KINDS = ("swap_colors", "swap_relation", "count", "digit", "color")  # the default hard negatives
ALL_EDIT_KINDS = (*EDIT_KINDS, "shape")  # every kind edit_caption knows (clip.negative_kinds)
_SHAPE = re.compile(r"\b(" + "|".join([*spec.PLURALS.values(), *spec.SHAPES]) + r")\b")


def _relation_parts(caption: str) -> tuple[str, str, str, str] | None:
    """(first object, relation phrase, second object, " on a <bg> background" or "") of "A rel B"."""
    m = _REL.match(caption)
    return (m.group(1), m.group(2), m.group(3), m.group(4) or "") if m else None


def flip_relation(caption: str) -> str | None:
    """"A left of B" as "A right of B" (above <-> below, ...); None without a relation."""
    parts = _relation_parts(caption)
    if not parts:
        return None
    first, rel, second, bg = parts
    for word, opposite in OPPOSITE.items():
        pattern = rf"\b{word}\b"
        if re.search(pattern, rel):
            return f"{first} {re.sub(pattern, opposite, rel)} {second}{bg}"
    return None


def other_relations(caption: str) -> list[str]:
    """"A left of B" with each of the three other relations (right of, above, below): the opposite
    side and both sides of the other axis; [] without a relation."""
    parts = _relation_parts(caption)
    if not parts:
        return []
    first, rel, second, bg = parts
    named = spec.WORD_RELATION[rel]
    return [f"{first} {spec.RELATION_WORDS[r][0]} {second}{bg}" for r in spec.RELATIONS if r != named]


def edit_caption(caption: str, kind: str, rng: random.Random) -> str | None:
    """A caption that contradicts `caption` in one way (a hard negative), or None if `kind` doesn't apply."""
    if kind == "swap_colors":
        found = _COLOR.findall(caption)
        if len(set(found)) < 2:
            return None
        a, b = found[0], next(c for c in found if c != found[0])
        return _COLOR.sub(lambda m: {a: b, b: a}.get(m.group(1), m.group(1)), caption)
    if kind == "swap_relation":
        parts = _relation_parts(caption)
        if not parts:
            return None
        first, rel, second, bg = parts
        if rng.random() < 0.5:  # swap the objects ...
            return f"{second} {rel} {first}{bg}"
        return flip_relation(caption)  # ... or flip the relation
    if kind == "count":
        m = _NUMBER.search(caption)
        if not m:
            return None
        other = rng.choice([w for w in NUMBER_WORDS if w != m.group(1)])
        return caption[: m.start()] + other + caption[m.end():]
    if kind == "digit":
        m = _DIGIT.search(caption)
        if not m:
            return None
        other = rng.choice([d for d in "0123456789" if d != m.group(1)])
        return caption[: m.start(1)] + other + caption[m.end(1):]
    if kind == "shape":  # the last shape word changed to one the caption does not name
        found = [spec.SINGULARS.get(w, w) for w in _SHAPE.findall(caption)]
        if not found:
            return None
        m = list(_SHAPE.finditer(caption))[-1]
        other = rng.choice([s for s in spec.SHAPES if s not in found])
        plural = m.group(1) in spec.SINGULARS
        return caption[: m.start()] + (spec.PLURALS[other] if plural else other) + caption[m.end():]
    if kind == "color":
        m = _COLOR.search(caption)
        if not m:
            return None
        other = rng.choice([c for c in COLOR_WORDS if c != m.group(1)])
        return caption[: m.start()] + other + caption[m.end():]
    raise ValueError(f"unknown edit kind {kind!r}")


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """One contradicting edit, preferring the ones bag-of-words models get wrong."""
    return next(iter(hard_negatives(caption, rng)), None)


def hard_negatives(caption: str, rng: random.Random, n: int = 1, kinds=EDIT_KINDS) -> list[str]:
    """Up to n distinct contradicting edits of `kinds`, in random order but a plain colour change last
    (only when fewer than n structural ones apply). n=1 with the default kinds is `hard_negative`."""
    kinds = list(kinds)
    rng.shuffle(kinds)
    kinds.sort(key=lambda k: k == "color")  # a plain colour change only when nothing structural applies
    out: list[str] = []
    for kind in kinds:
        edited = edit_caption(caption, kind, rng)
        if edited and edited != caption and edited not in out:
            out.append(edited)
            if len(out) == n:
                break
    return out


class ClipLoss(torch.nn.Module):
    """Symmetric InfoNCE over a batch; extra text rows (hard negatives) only add image->text negatives.

    Shaped after open_clip's ClipLoss; features are gathered across processes with gradients.
    """

    def forward(self, image_features, text_features, logit_scale, negative_features=None) -> dict:
        image_features, text_features = _gather(image_features), _gather(text_features)
        n = image_features.shape[0]
        texts = text_features if negative_features is None else torch.cat([text_features, _gather(negative_features)])
        logits_per_image = logit_scale * image_features @ texts.T  # (n, n + negatives)
        logits_per_text = logit_scale * text_features @ image_features.T  # (n, n)
        labels = torch.arange(n, device=image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss}


def _gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


class ClipTrainer(torch.nn.Module):
    """Wraps CLIPModel so one forward call (what DDP syncs on) gives the loss."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.loss = ClipLoss()

    def forward(self, pixel_values, input_ids, negative_ids=None):
        img = F.normalize(_features(self.clip.get_image_features(pixel_values=pixel_values)), dim=-1)
        txt = F.normalize(_features(self.clip.get_text_features(input_ids=input_ids)), dim=-1)
        neg = None
        if negative_ids is not None and len(negative_ids):
            neg = F.normalize(_features(self.clip.get_text_features(input_ids=negative_ids)), dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=100)
        return self.loss(img, txt, scale, neg)["contrastive_loss"]


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a model output in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def embed_images(clip, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> (N, D) unit vectors."""
    clip.eval()
    out = [_features(clip.get_image_features(pixel_values=pixel_values[i:i + batch_size]))
           for i in range(0, len(pixel_values), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def embed_texts(clip, input_ids: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    clip.eval()
    out = [_features(clip.get_text_features(input_ids=input_ids[i:i + batch_size]))
           for i in range(0, len(input_ids), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str],
                      ks=(1, 5, 10)) -> dict[str, float]:
    """open_clip-style `{a}_to_{b}_R@{k}` for pair i <-> i, plus caption-match recall.

    Captions repeat in ShapesWorld ("a red circle"), so `*_match_R@k` also counts a hit when the
    retrieved item carries the same caption text as the query's pair.
    """
    sims = image_emb @ text_emb.T  # (N images, N texts)
    cap_ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([cap_ids[c] for c in captions])
    out: dict[str, float] = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        order = s.argsort(dim=1, descending=True)
        truth = torch.arange(len(s))[:, None]
        rank = (order == truth).float().argmax(dim=1)
        out[f"{name}_mean_rank"] = float(rank.float().mean() + 1)
        out[f"{name}_median_rank"] = float(rank.float().median() + 1)
        same = cid[order] == cid[:, None]  # retrieved item has the query pair's caption
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
            out[f"{name}_match_R@{k}"] = float(same[:, :k].any(dim=1).float().mean())
    return out


def hard_negative_accuracy(clip, tokenizer, pixel_values, captions, seed: int = 0,
                           kinds=EDIT_KINDS) -> dict[str, float]:
    """Per edit kind: how often an image scores its true caption above the edited one."""
    from .tokenizer import encode

    rng = random.Random(seed)
    img = embed_images(clip, pixel_values)
    out = {}
    for kind in kinds:
        pairs = [(i, e) for i, c in enumerate(captions) if (e := edit_caption(c, kind, rng))]
        if not pairs:
            continue
        idx = [i for i, _ in pairs]
        pos = embed_texts(clip, encode(tokenizer, [captions[i] for i in idx])[0])
        neg = embed_texts(clip, encode(tokenizer, [e for _, e in pairs])[0])
        win = ((img[idx] * pos).sum(-1) > (img[idx] * neg).sum(-1)).float().mean()
        out[f"hard_negative_{kind}_acc"] = float(win)
    return out


def batch_negatives(captions: list[str], rng: random.Random, n: int = 1, kinds=EDIT_KINDS) -> list[str]:
    """Up to n hard negatives per caption, of `kinds`, where edits apply (others contribute none)."""
    return [e for c in captions for e in hard_negatives(c, rng, n, kinds)]
