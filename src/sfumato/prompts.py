"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, and prompts longer than the text tower's context.

    (word)        weight x 1.1         ((word)) x 1.21
    [word]        weight / 1.1
    (word:1.3)    weight 1.3           (a red circle:0.8) weights a whole phrase
    \\( \\) \\[ \\]   literal brackets
    a BREAK b     b starts a new chunk

A prompt is cut into chunks of the context less the start and end tokens (75 tokens for Stable
Diffusion); a full chunk breaks after its last comma when that comma is near its end. Each chunk is
encoded on its own, its token states are scaled by their weights and the chunk's mean is put back
(A1111's "original" emphasis), and the chunks are concatenated: the UNet's cross-attention reads
any number of tokens.

    states, notes = encode(tokenizer, text_encoder, ["a (red:1.3) circle, [blurry]"])

Written here rather than taken from compel, the maintained prompt-weighting library: compel reads its
own syntax ("word++", "(word)1.3"), has no BREAK, and lowers a weight by blending towards a prompt
without the word, so it would not draw an A1111 prompt the way A1111 does. The parsing rules follow
A1111's `parse_prompt_attention`, re-implemented.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

EMPHASIS = 1.1  # ( ) multiplies by this, [ ] divides by it
BREAK = object()  # a fragment that ends the current chunk

_TOKEN = re.compile(r"""
    \\[()\[\]\\]                                   # an escaped bracket or backslash
  | \( | \[                                        # an opening bracket
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)        # ':1.3)' closes a weighted group
  | \) | \]                                        # a closing bracket
  | [^\\()\[\]:]+                                  # plain text
  | : | \\                                         # a colon or backslash that is just text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(text: str) -> tuple[list[tuple[str, float] | object], list[str]]:
    """Fragments of `text` with their weights (and BREAK markers), and notes on brackets left open.

    An unclosed '(' or '[' weights everything after it, as in A1111; a ')' or ']' with nothing to
    close is kept as text."""
    frags: list = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for f in frags[start:]:
            if f is not BREAK:
                f[1] *= by

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if len(tok) == 2 and tok[0] == "\\":
            frags.append([tok[1], 1.0])
        elif tok == "(":
            rounds.append(len(frags))
        elif tok == "[":
            squares.append(len(frags))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif tok == ")" and rounds:
            scale(rounds.pop(), EMPHASIS)
        elif tok == "]" and squares:
            scale(squares.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    frags.append(BREAK)
                if part:
                    frags.append([part, 1.0])
    notes = []
    if rounds:
        notes.append(f"'(' without ')': everything after it is weighted x{EMPHASIS:g} (write \\( for a literal one)")
    if squares:
        notes.append(f"'[' without ']': everything after it is weighted /{EMPHASIS:g} (write \\[ for a literal one)")
    for pos in rounds:
        scale(pos, EMPHASIS)
    for pos in squares:
        scale(pos, 1 / EMPHASIS)
    merged: list = []
    for f in frags:
        if f is not BREAK and merged and merged[-1] is not BREAK and merged[-1][1] == f[1]:
            merged[-1][0] += f[0]
        else:
            merged.append(f)
    return [f if f is BREAK else (f[0], f[1]) for f in merged], notes


def plain(text: str) -> str:
    """The words of a prompt without its syntax (weights, brackets, BREAK)."""
    frags, _ = parse(text)
    return " ".join(" ".join(f[0] for f in frags if f is not BREAK).split())


@dataclass
class Tokens:
    """A prompt as chunks of token ids, each `context` long (start, tokens, end, padding)."""

    ids: list[list[int]]
    weights: list[list[float]]
    words: list[tuple[str, list[int]]] = field(default_factory=list)  # each word's positions in the chunks joined
    notes: list[str] = field(default_factory=list)


def tokenize(tokenizer, text: str) -> Tokens:
    """Chunk a prompt the way A1111 does; every chunk holds at most context - 2 tokens."""
    context = tokenizer.model_max_length
    size = context - 2
    # A1111 moves up to 20 of 75 tokens after the last comma to the next chunk; the same share here.
    backtrack = round(size * 20 / 75)
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma = comma[0] if len(comma) == 1 else None
    frags, notes = parse(text)
    words = [(w, f[1]) for f in frags if f is not BREAK for w in f[0].split()] if frags else []
    word_ids = tokenizer([w for w, _ in words], add_special_tokens=False, verbose=False).input_ids if words else []

    chunks: list[tuple[list[int], list[float], list[int]]] = []  # (tokens, weights, word index per token)
    cur: tuple[list[int], list[float], list[int]] = ([], [], [])
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = ([], [], []), -1

    k = 0
    for f in frags:
        if f is BREAK:
            close()
            continue
        for _ in f[0].split():
            for tok in word_ids[k]:
                if tok == comma:
                    last_comma = len(cur[0])
                elif len(cur[0]) == size and last_comma != -1 and len(cur[0]) - last_comma <= backtrack:
                    cut = last_comma + 1
                    moved = tuple(part[cut:] for part in cur)
                    for part in cur:
                        del part[cut:]
                    close()
                    cur = moved
                if len(cur[0]) == size:
                    close()
                cur[0].append(tok)
                cur[1].append(words[k][1])
                cur[2].append(k)
            k += 1
    if cur[0] or not chunks:
        close()

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = Tokens([], [], notes=notes)
    positions: dict[int, list[int]] = {}
    for c, (toks, ws, owners) in enumerate(chunks):
        fill = size - len(toks)
        out.ids.append([bos, *toks, eos] + [pad] * fill)  # as the tokenizer pads a short prompt
        out.weights.append([1.0, *ws, 1.0] + [1.0] * fill)
        for p, owner in enumerate(owners):
            positions.setdefault(owner, []).append(c * context + 1 + p)
    out.words = [(words[i][0], positions[i]) for i in sorted(positions)]
    return out


def empty_chunk(tokenizer) -> list[int]:
    """The token ids of an empty prompt: what a shorter prompt is padded with, chunk by chunk."""
    return tokenize(tokenizer, "").ids[0]


MEAN_FLOOR = 0.01  # see encode()


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Text states (B, chunks * context, width) of prompts in A1111's syntax, all padded to the same
    number of chunks with empty-prompt chunks; and the notes on each prompt's syntax.

    Weights scale each token's states, then the chunk's mean is restored. A1111 takes that mean over
    the whole batch; here it is per prompt, so an image does not depend on the prompts drawn with it."""
    unique = list(dict.fromkeys(prompts))
    toks = [tokenize(tokenizer, p) for p in unique]
    n_chunks = max(len(t.ids) for t in toks)
    empty = empty_chunk(tokenizer)
    ids, weights = [], []
    for t in toks:
        extra = n_chunks - len(t.ids)
        ids += t.ids + [empty] * extra
        weights += t.weights + [[1.0] * len(empty)] * extra
    ids_t = torch.tensor(ids, dtype=torch.long, device=text_encoder.device)
    z = text_encoder(ids_t)[0]
    w = torch.tensor(weights, dtype=z.dtype, device=z.device)
    weighted = (w != 1).any(dim=1)
    if weighted.any():
        zw = z[weighted]
        before = zw.mean(dim=(1, 2), keepdim=True)
        zw = zw * w[weighted][..., None]
        after = zw.mean(dim=(1, 2), keepdim=True)
        # A mean under 1 % of the states' typical size (a tower whose states centre on zero) is not
        # worth restoring, and dividing by it would blow the states up: such chunks keep the weights alone.
        floor = MEAN_FLOOR * zw.abs().mean(dim=(1, 2), keepdim=True)
        tiny = (before.abs() < floor) | (after.abs() < floor)
        ratio = torch.where(tiny, torch.ones_like(after), before / after)
        z = z.clone()
        z[weighted] = zw * ratio
    context = z.shape[1]
    z = z.reshape(len(unique), n_chunks * context, z.shape[-1])
    row = {p: i for i, p in enumerate(unique)}
    notes = list(dict.fromkeys(f"{n} (in {p!r})" for p, t in zip(unique, toks) for n in t.notes))
    return z[[row[p] for p in prompts]], notes


def check_weights(text: str, limit: float = 100.0) -> None:
    """Refuse weights no sampler can use (A1111 has no limit; a weight past ±limit is a typo)."""
    from .errors import UsageError

    frags, _ = parse(text)
    for f in frags:
        if f is not BREAK and not (math.isfinite(f[1]) and abs(f[1]) <= limit):
            raise UsageError(f"prompt weight {f[1]:g} on {f[0].strip()!r} is out of range (-{limit:g} to {limit:g})")
