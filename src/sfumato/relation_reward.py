"""Relation reward: train a distilled UNet through its own few-step sampler to put objects where the
caption's relation says.

The diffusion loss barely asks for relations (docs/recipe.md, rounds 9-11: flipping "left of" moves
the held-out error by under 1 %, and the relation moves the first object 0.3 px while the seed moves
it 27 px). This asks for them directly, in the way reward fine-tuning through the sampler does
(DRaFT, Clark et al. 2023; AlignProp, Prabhudesai et al. 2023): the student draws a batch of
ShapesWorld relation prompts from pure noise at the default settings, with gradients through every
step and the VAE decoder, and each image is scored on where the two named colours lie. The score
needs the scene of the caption (its colours and relation), which only training has; sampling is
untouched, and the model it leaves samples like any other. No library trains through a sampler on
a differentiable reward of this kind, so the loop is written here.

The score asks for the scene checker's rule (shapesworld.checker._relation: the offset along the
named axis positive and at least half the offset across) with room to spare: at least MARGIN px
along, and no more across than along. Centres are the centroids of
each named colour's soft mask; a colour too faint to place is asked to be there first (the mask is
narrow, so this can only strengthen a colour that is nearly there), and a colour spread over two
objects is asked to be one.

Off by default (`sfumato distill --reward-weight`). At the budgets measured (docs/recipe.md, round
12: up to 1,000 steps from a shipped few-step UNet) the UNet meets the reward by cheap routes,
painting a colour twice, smearing it, or drawing both words' attention to one place, and not by
reading the relation; the shipped model does not use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .evaluate import evaluation_prompts
from .shapesworld import spec

# Soft colour mask width in RGB (0-1): the closest two palette colours (yellow, orange) are 0.27
# apart, so each mask takes under 0.1 % of its neighbour.
COLOUR_SIGMA = 0.07
# Mass (px) below which a colour counts as missing: a small triangle covers 72 px, and the VAE
# redraws the faintest render of 200 at 39.
MIN_MASS = 20.0
# Spread (px, standard deviation along either axis) above which a colour's mask is more than one
# object: a large square's is 6.4, two small objects 20 px apart have 10.
MAX_SPREAD = 7.5
# Room to spare over the checker's rule (soft centroids are not the checker's object centres).
MARGIN = 6.0
ACROSS_PER_ALONG = 1.0
# Along-axis sign of the second object's offset from the first, and the axes (x = 0, y = 1).
_AXES = {"left": (0, 1.0), "right": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


@dataclass(frozen=True)
class RelationPrompt:
    text: str
    colours: tuple[str, str]
    relation: str


def relation_prompts(rng: random.Random, n: int, held_out_seeds: tuple[int, ...] = (0, 1)) -> list[RelationPrompt]:
    """n position prompts in the evaluation's form (two different shapes, any colours, any wording),
    none of them a prompt of the position evaluations at `held_out_seeds` (50 per category)."""
    held = {p for s in held_out_seeds for c, p in evaluation_prompts(50, s, ("position",))}
    out = []
    while len(out) < n:
        (a, b), (ca, cb) = rng.sample(spec.SHAPES, 2), (rng.choice(tuple(spec.COLORS)), rng.choice(tuple(spec.COLORS)))
        rel = rng.choice(spec.RELATIONS)
        text = f"a {ca} {a} {rng.choice(spec.RELATION_WORDS[rel])} a {cb} {b}"
        if ca != cb and text not in held:  # one colour for both cannot tell the objects apart
            out.append(RelationPrompt(text, (ca, cb), rel))
    return out


def colour_centres(images: torch.Tensor, colours: torch.Tensor, sigma: float = COLOUR_SIGMA):
    """Soft-mask centroids (B, K, 2) in px (x, y), masses (B, K) in px and spreads (B, K, 2: standard
    deviations along x and y) in px of K colours (B, K, 3) in images (B, 3, H, W) of range 0-1."""
    _, _, h, w = images.shape
    d2 = ((images[:, None] - colours[:, :, :, None, None]) ** 2).sum(2)  # (B, K, H, W)
    m = torch.exp(-d2 / (2 * sigma * sigma))
    mass = m.sum((2, 3))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=images.dtype), torch.arange(w, dtype=images.dtype), indexing="ij")
    cx = (m * xs).sum((2, 3)) / mass.clamp(min=1e-6)
    cy = (m * ys).sum((2, 3)) / mass.clamp(min=1e-6)
    sx = ((m * (xs - cx[..., None, None]) ** 2).sum((2, 3)) / mass.clamp(min=1e-6)).clamp(min=1e-6).sqrt()
    sy = ((m * (ys - cy[..., None, None]) ** 2).sum((2, 3)) / mass.clamp(min=1e-6)).clamp(min=1e-6).sqrt()
    return torch.stack([cx, cy], -1), mass, torch.stack([sx, sy], -1)


def _placement(offset: torch.Tensor, relations: list[str], scale: float) -> torch.Tensor:
    """Hinge (B,) on offsets (B, 2: second centre minus first, px) against the named relations: 0 with
    at least MARGIN along the named axis and no more across than ACROSS_PER_ALONG times that."""
    axis = torch.tensor([_AXES[r][0] for r in relations])
    sign = torch.tensor([_AXES[r][1] for r in relations], dtype=offset.dtype)
    along = sign * offset.gather(1, axis[:, None])[:, 0] / scale
    across = offset.gather(1, (1 - axis)[:, None])[:, 0].abs() / scale
    return (torch.relu(MARGIN - along) + torch.relu(across - ACROSS_PER_ALONG * along)) / MARGIN


def relation_loss(images: torch.Tensor, prompts: list[RelationPrompt], scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mean hinge loss (about 0-2; 0 when every relation holds with the generator's margin) of images
    (B, 3, H, W) in 0-1 against their prompts; `scale`: image px per 64-px unit. Metrics: the share
    of images whose two colours are present and placed as named."""
    colours = torch.tensor([[spec.COLORS[c] for c in p.colours] for p in prompts], dtype=images.dtype) / 255
    centres, mass, spread = colour_centres(images, colours)
    placed = _placement(centres[:, 1] - centres[:, 0], [p.relation for p in prompts], scale)
    present = torch.relu(1 - mass / (MIN_MASS * scale * scale)).sum(1)  # 0 once both colours show
    # Moving a centroid is cheaper by painting a second object than by moving the first.
    split = (torch.relu(spread / scale - MAX_SPREAD) / MAX_SPREAD).sum((1, 2))
    ok = (present == 0) & (placed == 0) & (split == 0)
    loss = torch.where(present > 0, present, placed + split)  # place a colour only once it is there
    return loss.mean(), {"relation_ok": ok.float().mean().item(), "colours_present": (present == 0).float().mean().item(),
                         "one_object_each": (split == 0).float().mean().item()}


def attention_relation_loss(maps: torch.Tensor, relations: list, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The same hinge on where the two head words' cross-attention gathers (layout.Relation each;
    maps (B, T, H, W) at image size, as layout search reads them; `scale`: px per 64-px unit)."""
    from .layout import soft_centre

    offset = torch.stack([soft_centre(m[list(rel.second_tokens)].sum(0)) - soft_centre(m[list(rel.first_tokens)].sum(0))
                          for m, rel in zip(maps, relations)])
    placed = _placement(offset, [rel.relation for rel in relations], scale)
    return placed.mean(), {"relation_ok": (placed == 0).float().mean().item()}


class RelationReward:
    """The reward term of one training step: a batch of relation prompts drawn by the student at the
    default settings (guidance, steps), with gradients through the whole chain.

    target "pixels": the decoded image is scored (relation_loss); "attention": the sampler stops
    after the steps layout search looks ahead, and the two head words' cross-attention at the finest
    layers of the last of them is scored (attention_relation_loss) — where layout search finds the
    layout already decided, and no decoder is run. `scheduler` is the reward's own (it holds state):
    pipeline.make_scheduler hands out a fresh one."""

    def __init__(self, pipe, scheduler, steps: int, guidance: float, batch_size: int, seed: int,
                 every_step: bool = False, target: str = "pixels"):
        from .layout import find_relation
        from .sampling import encode_prompts

        if target not in ("pixels", "attention"):
            raise ValueError(f"reward target must be pixels or attention, got {target!r}")
        self.vae, self.scheduler, self.steps, self.guidance = pipe.vae, scheduler, steps, guidance  # its own (stateful)
        self.batch_size, self.every_step, self.target = batch_size, every_step, target
        self.prompts = relation_prompts(random.Random(f"sfumato-relation-reward/{seed}"), 4096)
        self.relations = [find_relation(pipe.tokenizer, p.text) for p in self.prompts]
        assert all(self.relations), "every ShapesWorld relation wording is one layout search reads"
        self.states = encode_prompts(pipe.tokenizer, pipe.text_encoder, [p.text for p in self.prompts]).float()
        self.latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        self.native = pipe.native
        self.scale = pipe.native / spec.BASE_RES
        self.vae.requires_grad_(False)

    def __call__(self, model, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        from .sampling import denoise

        pick = torch.randint(len(self.prompts), (self.batch_size,), generator=g)
        prompts = [self.prompts[i] for i in pick.tolist()]
        ctx = self.states[pick]
        noise = torch.randn((self.batch_size, *self.latent_shape), generator=g)
        if self.target == "attention":
            return self._attention(model, ctx, noise, [self.relations[i] for i in pick.tolist()], g)
        estimates = []  # every step's x0, when the layout each step already shows is scored too
        keep = (lambda d: estimates.append(d["x0"])) if self.every_step else None
        latents = denoise(model, self.scheduler, ctx, ctx, noise, self.steps, self.guidance, keep, g, grad=True)
        if self.every_step:
            latents = torch.cat(estimates)
            prompts = prompts * self.steps
        images = (self.vae.decode(latents / self.vae.config.scaling_factor).sample.float() + 1) / 2  # -1..1 -> 0..1
        return relation_loss(images.clamp(0, 1), prompts, self.scale)

    def _attention(self, model, ctx, noise, relations, g):
        from .attention import AttentionStore, swap_cross_attention_processors
        from .layout import look_ahead
        from .sampling import denoise

        until = look_ahead(self.steps)
        store = AttentionStore(self.native, self.native, finest=True)
        with swap_cross_attention_processors(model, store, keep_grad=True):
            def keep_last_step(state):
                if state["i"] + 1 < until:
                    store.reset()

            denoise(model, self.scheduler, ctx, ctx, noise, self.steps, self.guidance, keep_last_step, g, until=until,
                    grad=True)
        return attention_relation_loss(store.maps(), relations, self.scale)
