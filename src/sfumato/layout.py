"""Layout search: honour a spatial relation the prompt names by choosing among starting noises.

A small UNet trained on few pairs puts objects where its starting noise leads it, whatever relation
the prompt names: in the default model, changing only "left of" to "above" moves the first object
0.3 px, changing only the seed 27 px (docs/recipe.md, round 10). Which noise is kept can be chosen,
though. For a prompt "A <relation> B" (one relation, the four of ShapesWorld's grammar and a few
more wordings), K candidate noises are drawn, the first half of the sampler runs on all of them,
and the cross-attention of A's and B's last words (their heads: "a red *circle*") is read as
`explain` reads it. The candidate whose two words lie most clearly in the named relation is then
sampled as usual. Like diffusers' Attend-and-Excite it reads the model's own attention while
sampling; unlike it, no latent is changed, so the image is one the model draws from that noise.

Opt-in (`--layout-search 8`): it is a choice among samples, so the model's own scores (`sfumato
eval compositional`) are measured without it. Written here: no library chooses noises by attention.
Candidate 0 is the image's own seed; the seed drawn is written into the PNG's parameters ("Layout
seed"), so `--seed S` with the search off draws the same image again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .shapesworld import spec

# ShapesWorld's relation wordings and a few more; matched longest first ("to the left of" before "left of").
RELATION_PHRASES = {r: (*spec.RELATION_WORDS[r], *more) for r, more in {
    "left": ("on the left side of",), "right": ("on the right side of",), "above": (), "below": ("underneath",),
}.items()}
_PHRASES = sorted(((tuple(p.split()), r) for r, ps in RELATION_PHRASES.items() for p in ps),
                  key=lambda x: -len(x[0]))
# Words that end the second object's phrase ("a blue square *on* a black background").
_PHRASE_END = frozenset("on in at with and near by beside while against".split())
SEED_STRIDE = 104_729  # candidate j of seed s draws seed s + j * SEED_STRIDE (mod 2**32)


@dataclass(frozen=True)
class Relation:
    """'A <relation> B' in a prompt: the relation and the token positions of A's and B's head words."""

    relation: str  # left | right | above | below
    first: str
    second: str
    first_tokens: tuple[int, ...]
    second_tokens: tuple[int, ...]


def _key(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def find_relation(tokenizer, prompt: str) -> Relation | None:
    """The one spatial relation between two objects in `prompt`, or None (none, several, or an
    object phrase missing). Words are read as the pipeline encodes them (prompts.tokenize)."""
    from .prompts import tokenize

    words = tokenize(tokenizer, prompt).words
    keys = [_key(w) for w, _ in words]
    found = []
    i = 0
    while i < len(keys):
        match = next(((p, r) for p, r in _PHRASES if tuple(keys[i:i + len(p)]) == p), None)
        if match:
            found.append((i, i + len(match[0]), match[1]))
            i += len(match[0])
        else:
            i += 1
    if len(found) != 1:
        return None
    start, end, relation = found[0]
    # A's head: the last word before the relation; B's: the last word of the phrase after it.
    a = start - 1
    if a < 0 or not keys[a] or words[a][0].rstrip().endswith((",", ";")):
        return None
    b = end
    while b + 1 < len(keys) and keys[b + 1] not in _PHRASE_END and not words[b][0].endswith((",", ";", ".")):
        b += 1
    if b >= len(keys) or not keys[b] or keys[b] in _PHRASE_END:
        return None
    return Relation(relation, words[a][0], words[b][0], tuple(words[a][1]), tuple(words[b][1]))


def soft_centre(m: torch.Tensor) -> torch.Tensor:
    """(x, y) centre of the part of an (H, W) map above its mean, as a tensor that keeps gradients."""
    m = (m - m.mean()).clamp_min(0)
    h, w = m.shape
    total = m.sum().clamp_min(1e-12)
    ys = torch.arange(h, dtype=m.dtype, device=m.device)[:, None]
    xs = torch.arange(w, dtype=m.dtype, device=m.device)[None, :]
    return torch.stack([(m * xs).sum() / total, (m * ys).sum() / total])


def centroid(m: torch.Tensor) -> tuple[float, float]:
    """(x, y) centre of the part of an (H, W) map above its mean: where a word's attention gathers."""
    x, y = soft_centre(m).tolist()
    return x, y


def relation_margin(a: tuple[float, float], b: tuple[float, float], relation: str) -> float:
    """How clearly A lies in `relation` to B, in px: the offset along the named axis less half the
    offset across it (ShapesWorld's checker accepts a pair when this is >= 0 and the sign is right)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along - abs(across) / 2


def margins(maps: torch.Tensor, rel: Relation) -> list[float]:
    """Relation margin of each candidate from its (T, H, W) token maps."""
    out = []
    for m in maps:
        a = m[[p for p in rel.first_tokens if p < m.shape[0]]].sum(0)
        b = m[[p for p in rel.second_tokens if p < m.shape[0]]].sum(0)
        out.append(relation_margin(centroid(a), centroid(b), rel.relation))
    return out


def candidate_seeds(seed: int, k: int) -> list[int]:
    """The seeds layout search tries for an image of `seed`: its own first."""
    return [seed] + [(seed + j * SEED_STRIDE) % 2**32 for j in range(1, k)]


def look_ahead(steps: int) -> int:
    """Sampler steps run on every candidate before one is chosen: half of them. The layout shows in
    the attention from there (default model, 6 LCM steps: choosing after step 1, 2, 3 drew 0.22,
    0.46, 0.62 of position prompts right; benchmarks/layout_search.py)."""
    return max(1, (steps + 1) // 2)
