"""First-step mean matching: the few-step UNet's first estimate, averaged over starting noises, made
the data's mean for the prompt (`sfumato tune --objective mean`).

The LCM sampler decides where objects go at its first step: D(x_T) from pure noise, which every later
step re-noises and keeps the layout of. A consistency model's D(x_T) is meant to be a sample of the
data given the prompt, so its average over x_T should be the data's conditional mean: for "a red
circle to the left of a blue square", red mass on the left and blue on the right. The model's average
ignores the relation (docs/recipe.md, round 10: the first step's two colour centroids 2 px apart
under all four relations, 25 px in the renders), and the diffusion loss asks for that mean only
through single renders, whose spread hides it.

This objective asks for the relation's part of that mean directly, at low variance. For a prompt p,
let mu_r be the mean latent of renders of p's scenes under each of the four relations r (ShapesWorld's
own placement, `scenes_for`; read in training only) and m_r the starting UNet's mean first estimate
under p with r's words, over the same starting noises. The target of each sample of variant r is
the starting UNet's own first estimate moved by the difference of the two contrasts,

    target(z) = D_ref(z) + gain * ((mu_r - mean_r' mu_r') - (m_r - mean_r' m_r')),

so each sample keeps its own shapes and layout, only the group's average moves, and it moves by what
the relation changes in the data and nothing else: the model's own background, style and offsets
cancel in the contrasts (the plain data mean, whose randomly drawn backgrounds average to grey,
moved every estimate off the model's white; regressing on renders blurs the estimate and loses
objects, round 14). Every update trains all four variants of each prompt over shared noises: their
shifts sum to zero, so only a UNet that reads the relation words can lower the loss (trained on the
prompt's own relation alone, the UNet learnt each prompt's shift from its colours and shapes and
drew no relation contrast at all; docs/recipe.md, round 16). The gain (4 by default) asks for more
than the data's own contrast, as guidance asks for more than the conditional score: the first
estimate is mostly noise again at the next step, and at gain 1 too little of the shift survives to
steer the layout (round 16 measures 0 to 8). Prompts without a relation are kept at the reference. A
second term keeps every later step at the starting UNet's estimate (each on a share of the batch), on
the reference's first estimates noised to that step. Sampling is untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import torch

from .shapesworld import spec
from .shapesworld.checker import PromptSpec


def scenes_for(prompt: PromptSpec, n: int, rng: random.Random, res: int = spec.BASE_RES) -> list[np.ndarray]:
    """n renders (res, res, 3 uint8) of scenes `prompt` describes, what it leaves free drawn as the
    generator draws it: colour, size, background, and the placement under its relation."""
    from .shapesworld.render import Obj, Scene, place, render

    images = []
    for _ in range(n):
        objs = [Obj(o.shape, o.color or rng.choice(tuple(spec.COLORS)),
                    None if o.shape == "digit" else (o.size or rng.choice(("small", "large"))), o.digit)
                for o in prompt.objects]
        for _ in range(100):
            if place(rng, objs, prompt.relation):
                break
        else:  # pragma: no cover - every caption of the grammar fits the canvas
            raise RuntimeError(f"could not place the objects of {prompt.text!r}")
        background = prompt.background or rng.choice(tuple(spec.BACKGROUNDS))
        images.append(np.asarray(render(Scene(background, objs, "mean"), res=res)))
    return images


def relation_variants(prompt: PromptSpec) -> list[PromptSpec]:
    """The prompt under each relation, its own first, in the same wording where the grammar has one
    (the n-th phrase of one relation becomes the n-th of another, or its last); [prompt] when it names none."""
    if prompt.relation is None:
        return [prompt]
    out = [prompt]
    for r in spec.RELATIONS:
        if r != prompt.relation:
            phrase = spec.phrase_for(prompt.relation_phrase, r)
            text = f" {prompt.text} ".replace(f" {prompt.relation_phrase} ", f" {phrase} ", 1).strip()
            out.append(dataclasses.replace(prompt, text=text, relation=r, relation_phrase=phrase))
    return out


@torch.no_grad()
def render_means(vae, prompts: list[PromptSpec], renders: int, seed: str, res: int = spec.BASE_RES) -> torch.Tensor:
    """(len(prompts), C, H, W): the mean latent of `renders` renders of each prompt's scenes, every
    prompt's free attributes drawn from the same seed (so prompts that differ in their relation only
    differ in the placement)."""
    from .sampling import encode_images

    images = [scenes_for(p, renders, random.Random(seed), res) for p in prompts]
    z = encode_images(vae, torch.from_numpy(np.stack([i for group in images for i in group])).permute(0, 3, 1, 2))
    return z.float().view(len(prompts), renders, *z.shape[1:]).mean(1)


@torch.no_grad()
def data_contrasts(vae, prompt: PromptSpec, renders: int, seed: str, res: int = spec.BASE_RES) -> torch.Tensor:
    """(variants, C, H, W): for each of `relation_variants(prompt)`, mu_r - mean over relations of mu_r',
    what its relation changes in the mean latent of its renders (zero without a relation). Each
    relation's renders draw their free attributes from the same seed, so the contrasts are little
    noisier than the means are apart."""
    means = render_means(vae, relation_variants(prompt), renders, seed, res)
    return means - means.mean(0)


def data_contrast(vae, prompt: PromptSpec, renders: int, seed: str, res: int = spec.BASE_RES) -> torch.Tensor:
    """The prompt's own relation contrast (C, H, W): the first of `data_contrasts`."""
    return data_contrasts(vae, prompt, renders, seed, res)[0]


def model_contrasts(estimates: torch.Tensor) -> torch.Tensor:
    """(variants, group, C, H, W) first estimates of a prompt's relation variants over shared noises ->
    each variant's mean less the mean over variants (variants, C, H, W)."""
    means = estimates.mean(1)
    return means - means.mean(0)


def model_contrast(estimates: torch.Tensor) -> torch.Tensor:
    """The own variant's (the first's) contrast of `model_contrasts` (C, H, W)."""
    return model_contrasts(estimates)[0]


class MeanLoss:
    """One update: `prompts` prompts, each under every relation over `group` shared starting noises; the
    first estimate regressed on the starting UNet's, moved by the relation's contrast in the data less
    its contrast in the starting UNet, plus the later steps kept at the reference."""

    def __init__(self, pipe, cfg, reward_fn=None, steps: int | None = None, guidance: float | None = None):
        from .reward_tuning import few_step_policy, training_prompts
        from .shapesworld.checker import parse_prompt

        self.pipe, self.cfg = pipe, cfg
        self.policy = few_step_policy(pipe, steps, guidance)
        self.reference = copy.deepcopy(pipe.fast_unet).eval().requires_grad_(False)
        drawn = training_prompts(random.Random(f"sfumato-tune/{cfg.seed}"), cfg.pool, cfg.categories,
                                 cfg.held_out_seeds)
        self.variants = [relation_variants(parse_prompt(p)) for _, p in drawn]
        self.contrasts: dict[int, torch.Tensor] = {}  # prompt index -> data contrast, rendered when first drawn
        shape = pipe.fast_unet.config
        self.latent_shape = (shape.in_channels, shape.sample_size, shape.sample_size)

    def data_contrasts(self, i: int) -> torch.Tensor:
        if i not in self.contrasts:
            self.contrasts[i] = data_contrasts(self.pipe.vae, self.variants[i][0], self.cfg.renders,
                                               f"sfumato-mean/{self.cfg.seed}/{i}", self.pipe.native)
        return self.contrasts[i]

    def __call__(self, model, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        from .sampling import encode_prompts

        cfg, policy, G = self.cfg, self.policy, self.cfg.group
        pick = torch.randint(len(self.variants), (cfg.prompts,), generator=g).tolist()
        t0 = policy.timesteps[0]
        counts = [len(self.variants[i]) for i in pick]
        # every relation variant of a prompt over the same noises, all prompts in one batch
        z = torch.cat([torch.randn((G, *self.latent_shape), generator=g).repeat(n, 1, 1, 1) for n in counts])
        with torch.no_grad():
            ctx = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder,
                                 [v.text for i in pick for v in self.variants[i] for _ in range(G)]).float()
            ref = policy.denoised(self.reference, z, t0, ctx)
            shift = torch.cat([
                cfg.gain * (self.data_contrasts(i) - model_contrasts(est.view(n, G, *self.latent_shape)))
                for i, n, est in zip(pick, counts, ref.split([n * G for n in counts]))]).repeat_interleave(G, 0)
        first = ((policy.denoised(model, z, t0, ctx) - ref - shift) ** 2).mean()
        loss, stats = first, {"first": first.item(), "shift": shift.pow(2).mean().item()}
        later = policy.timesteps[1:]
        if later:  # every later step kept where the reference has it, each on its share of the samples
            keep, noise = torch.zeros(()), torch.randn(ref.shape, generator=g)
            for k, t in enumerate(later):
                rows = torch.arange(k, len(ref), len(later))
                a = policy.alphas[t]
                x = a.sqrt() * ref[rows] + (1 - a).sqrt() * noise[rows]
                with torch.no_grad():
                    kept = policy.denoised(self.reference, x, t, ctx[rows])
                keep = keep + ((policy.denoised(model, x, t, ctx[rows]) - kept) ** 2).sum() / ref.numel()
            loss, stats["keep"] = loss + keep, keep.item()
        return loss, stats


__all__ = ["MeanLoss", "data_contrast", "data_contrasts", "model_contrast", "model_contrasts", "relation_variants",
           "render_means", "scenes_for"]
