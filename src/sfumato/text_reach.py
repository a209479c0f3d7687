"""How far a prompt's relation reaches into the text states of the words after it, and a text tower
taught to carry it there.

A causal text tower folds "to the left of" into the relation word's own state and into almost nothing
that follows it (round 14 of docs/recipe.md: 4 % of a left/right swap reaches the words after it,
against 32 % for a colour swap), so no object word can say which side it is on. `reach` measures
that share; `fit_reach` trains a tower until a relation flip changes those words' states by a target
share, while every other state stays near the starting tower's (so a UNet trained on the old states
still reads the new ones).

Training only: the flip rewrites ShapesWorld's relation phrases to build the contrast; nothing here
runs at generation time. Written here because no library trains a tower on such token-level
contrasts.
"""

from __future__ import annotations

import copy
import random

import torch

from .shapesworld import spec

# the categories whose prompts are held near the old states: those with prompts enough beyond the held-out
# evaluations (single objects, colours, sizes and plain pairs are all among them; these prompts name those words too)
KEEP_CATEGORIES = ("background", "counting", "position", "attribute_binding", "text")


def flipped_relation(prompt: str) -> str | None:
    """The prompt with its relation phrase turned to the opposite side ("to the left of" -> "to the right
    of", "over" -> "under"), or None when it names no relation."""
    found = [(len(w), w, r) for w, r in spec.WORD_RELATION.items() if f" {w} " in f" {prompt} "]
    if not found:
        return None
    _, word, rel = max(found)
    twin = spec.phrase_for(word, spec.OPPOSITE[rel])
    return f" {prompt} ".replace(f" {word} ", f" {twin} ", 1).strip()


def after_relation(ids: torch.Tensor, flipped: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the tokens two prompts share after their relation phrases, up to the end token, in
    each (the phrases may differ in length: "on top of" / "beneath")."""
    e, f = int((ids == eos).nonzero()[0, 0]), int((flipped == eos).nonzero()[0, 0])
    m = 0
    while m <= min(e, f) and ids[e - m] == flipped[f - m]:
        m += 1
    return torch.arange(e - m + 1, e + 1), torch.arange(f - m + 1, f + 1)


def reach(tokenizer, tower, prompts: list[str]) -> torch.Tensor:
    """Per prompt that names a relation: the relative change of the states of the words after the
    relation when it flips (mean over those words); differentiable through `tower`."""
    from .sampling import prompt_ids

    pairs = [(p, q) for p in dict.fromkeys(prompts) if (q := flipped_relation(p)) is not None]
    if not pairs:
        return torch.zeros(0)
    ids = prompt_ids(tokenizer, [p for p, _ in pairs] + [q for _, q in pairs])
    states = tower(ids)[0].float()
    n, changes = len(pairs), []
    for i in range(n):
        a, b = after_relation(ids[i], ids[n + i], tokenizer.eos_token_id)
        h, h2 = states[i, a], states[n + i, b]
        changes.append(((h - h2).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-6)).mean())
    return torch.stack(changes)


def reach_loss(tokenizer, tower, prompts: list[str], target: float) -> tuple[torch.Tensor, float]:
    """How far the prompts' relations fall short of reaching `target` (hinge, mean over the prompts
    that name one), and the mean reach."""
    change = reach(tokenizer, tower, prompts)
    if not len(change):
        return torch.zeros(()), float("nan")
    return torch.relu(target - change).mean(), change.mean().item()


def fit_reach(tokenizer, tower, steps: int = 300, target: float = 0.3, keep: float = 1.0, lr: float = 1e-3,
              batch: int = 64, seed: int = 0, progress: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """A copy of `tower` trained until relation flips reach the words after them by `target`, with every
    state of the batch's prompts (half relations, half KEEP_CATEGORIES) held near the starting tower's
    (mean squared relative error, weight `keep`). Prompts are drawn as `sfumato tune` draws them (never
    one of the held-out evaluations). Returns the new tower and a log per step."""
    from .progress import start_progress
    from .reward_tuning import training_prompts
    from .sampling import prompt_ids

    frozen = tower.eval().requires_grad_(False)
    tuned = copy.deepcopy(frozen).train().requires_grad_(True)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    relation = [p for _, p in training_prompts(random.Random(f"reach/{seed}"), 4096, ("position",))]
    every = [p for _, p in training_prompts(random.Random(f"reach-keep/{seed}"), 4096, KEEP_CATEGORIES)]
    g, log = random.Random(seed), []
    bar = start_progress(steps, "tower reach", "count", stderr=True) if progress else None
    for step in range(steps):
        rel = g.sample(relation, batch // 2)
        other = g.sample(every, batch // 2)
        short, mean_reach = reach_loss(tokenizer, tuned, rel, target)
        ids = prompt_ids(tokenizer, rel + other)
        with torch.no_grad():
            old = frozen(ids)[0].float()
        new = tuned(ids)[0].float()
        drift = (((new - old) ** 2).sum(-1) / (old ** 2).sum(-1).clamp_min(1e-6)).mean()
        loss = short + keep * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step + 1, "short": short.item(), "reach": mean_reach, "drift": drift.item()})
        if bar:
            bar[0].advance(bar[1])
    if bar:
        bar[0].stop()
    return tuned.eval().requires_grad_(False), log


__all__ = ["flipped_relation", "after_relation", "reach", "reach_loss", "fit_reach"]
