"""Reward tuning: the few-step UNet trained by group-relative policy optimisation on the scene checker's
verdicts of its own samples.

    sfumato tune MODEL --out MODEL-tuned --steps 300            # position prompts
    sfumato tune MODEL --in-place --categories position,counting
    sfumato tune MODEL --out MODEL-tuned --objective repair --lr 1e-5   # preferences for repaired samples

The diffusion loss barely asks for relations (docs/recipe.md: flipping "left of" moves its error by
under 1 %), and a differentiable score of the image is met by cheap routes (round 12: a colour
painted twice or smeared). Here the reward is the checker's verdict itself, the judge of `sfumato
eval compositional`, which fails a second copy, a smear or a missing shape as it fails a wrong
relation, and it is used as a policy-gradient reward (DDPO, Black et al. 2023; GRPO, Shao et al.
2024; Flow-GRPO, Liu et al. 2025):

- The LCM sampler is a Markov chain of Gaussian steps: each step but the last draws
  x' = sqrt(a') * D(x) + sqrt(1 - a') * noise, with D the UNet's denoised estimate. So the
  log-probability of each step a sample took is a differentiable function of the UNet.
- Each prompt is drawn `group` times; a sample's advantage is its reward less the mean of its group,
  over the group's spread. The loss is minus the advantage times the log-probability of the sample's
  steps, so steps that led to a passing image become more likely under the same text.
- Antithetic noise: half of each group is the other half mirrored along the prompt's relation axis
  (left-right, or top-bottom for "above"/"below"), every step's noise too. The UNet is nearly
  mirror-equivariant, so such a pair is drawn as mirrored layouts, one with the relation held and
  one with it flipped, with the same shapes; their difference in reward is the relation alone.

The repair objective (`RepairLoss`) trains on the same draws by preference instead: each failed
sample is paired with a better one (its repair when only the relation is wrong, else a passing
sample of its group) and the UNet learns to prefer the better (Diffusion-DPO).

With `tower_lr` the text tower trains along (`WithTower`), and `reach` adds `text_reach`'s term
asking it to carry each relation into the words after it.

Only training reads the prompts' scenes (to judge the samples); sampling is untouched, and the tuned
UNet is a plain diffusers UNet. The training prompts leave out every prompt of the evaluations at
`held_out_seeds`. diffusers and TRL have no policy-gradient trainer for a few-step consistency
sampler with a rule-based reward, so the loop is written here, on the training engine (checkpoints,
resume, progress).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UsageError
from .shapesworld import spec


@dataclass
class TuneCfg:
    steps: int = 300  # policy updates
    prompts: int = 8  # prompts per update
    group: int = 8  # samples per prompt (even with mirror: half are the other half mirrored)
    lr: float = 1e-4
    warmup: int = 10
    categories: tuple[str, ...] = ("position",)
    partial: float = 0.5  # reward for the right objects with the relation wrong (1 for a pass)
    kl: float = 0.0  # weight of the KL divergence of each step from the starting UNet's
    mirror: bool = True
    objective: str = "policy"  # "policy" (the policy gradient), "repair" (preferences for repaired samples)
    # or "mean" (the first estimate's average made the data's mean, `first_step`)
    beta: float = 2000.0  # the repair objective's preference strength (Diffusion-DPO's beta)
    tower_lr: float = 0.0  # learning rate of the text tower trained along (0: frozen)
    reach: float = 0.0  # weight of the relation's reach into the words after it (needs tower_lr)
    reach_target: float = 0.3  # the relative change of those words' states asked for when the relation flips
    pool: int = 256  # the mean objective's training prompts (each one's renders are made once)
    renders: int = 16  # renders per relation averaged into each of the mean objective's data means
    position_input: bool = False  # grow the UNet's position input first (`stages.with_position_input`)
    gain: float = 4.0  # the mean objective's relation contrast asked for, in multiples of the data's
    held_out_seeds: tuple[int, ...] = (0, 1)  # evaluation seeds whose prompts are never trained on
    seed: int = 0
    checkpoint_every: int = 50


RANGES = {"steps": (1, 10**7), "prompts": (1, 4096), "group": (2, 4096), "lr": (0, 1), "warmup": (0, 10**7),
          "partial": (0, 1), "kl": (0, 1000), "tower_lr": (0, 1), "reach": (0, 1000), "reach_target": (0, 10),
          "beta": (0, 10**7), "checkpoint_every": (1, 10**7), "pool": (1, 10**6), "renders": (1, 4096),
          "gain": (0, 100)}


OBJECTIVES = ("policy", "repair", "mean")


def check(cfg: TuneCfg) -> None:
    for key, (low, high) in RANGES.items():
        v = getattr(cfg, key)
        if not low <= v <= high:
            raise UsageError(f"tune {key} must be between {low:g} and {high:g}, got {v!r}")
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"tune objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.reach > 0 and cfg.tower_lr <= 0:
        raise UsageError("tune reach trains the text tower: give a tower learning rate (--tower-lr) as well")
    if cfg.objective == "mean" and cfg.tower_lr > 0:
        raise UsageError("tune objective mean trains the few-step UNet only; leave out --tower-lr")
    if cfg.mirror and cfg.group % 2 and cfg.objective != "mean":
        raise UsageError(f"tune group must be even with mirrored noise (half the group mirrors the other), got {cfg.group}")
    bad = [c for c in cfg.categories if c not in spec.CATEGORIES]
    if bad or not cfg.categories:
        raise UsageError(f"unknown categor{'ies' if len(bad) > 1 else 'y'} {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(spec.CATEGORIES)}")


# ---------------------------------------------------------------- prompts and rewards


def training_prompts(rng: random.Random, n: int, categories: tuple[str, ...],
                     held_out_seeds: tuple[int, ...] = (0, 1)) -> list[tuple[str, str]]:
    """n (category, prompt) pairs drawn as the evaluation draws them, the categories in turn, none of
    them a prompt of the evaluations (50 per category) at `held_out_seeds`."""
    from .evaluate import evaluation_prompts, sample_prompt

    held = {p for s in held_out_seeds for _, p in evaluation_prompts(50, s)}
    out, misses = [], 0
    while len(out) < n:
        category = categories[len(out) % len(categories)]
        prompt = sample_prompt(rng, category)
        if prompt in held:
            misses += 1
            if misses > 1000 * (len(out) + 1):
                raise UsageError(f"the {category} prompts are all prompts of the held-out evaluations "
                                 f"(seeds {', '.join(map(str, held_out_seeds))}); tune other categories")
            continue
        out.append((category, prompt))
    return out


def verdict_reward(image: np.ndarray, prompt, partial: float) -> tuple[float, bool]:
    """The checker's reward for one image (H, W, 3 uint8) against a parsed prompt: 1 for a pass,
    `partial` when only a named relation fails, else 0; and whether it passed."""
    from .shapesworld.checker import check as judge_scene
    from .shapesworld.checker import parse_image

    scene = parse_image(image)
    if judge_scene(scene, prompt).passed:
        return 1.0, True
    if prompt.relation is not None and judge_scene(scene, dataclasses.replace(prompt, relation=None)).passed:
        return partial, False
    return 0.0, False


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, group) rewards -> advantages: less the group's mean, over its spread (plus 0.1, so
    a group that differs by one sample in eight does not get advantages of ±2.5)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 0.1)


def mirror_axes(prompts) -> torch.Tensor:
    """The latent axis each parsed prompt is mirrored along: rows (2) for above/below, else columns (3)."""
    return torch.tensor([2 if p.relation in ("above", "below") else 3 for p in prompts])


def antithetic_noise(shape: tuple[int, ...], axes: torch.Tensor, group: int, g: torch.Generator) -> torch.Tensor:
    """Noise (len(axes) * group, *shape): each group's second half is its first half mirrored along
    that prompt's axis."""
    half = torch.randn((len(axes), group // 2, *shape), generator=g)
    mirrored = torch.stack([h.flip(int(a)) for h, a in zip(half, axes)])
    return torch.cat([half, mirrored], 1).flatten(0, 1)


# ---------------------------------------------------------------- the sampler as a policy


class FewStepPolicy:
    """The LCM sampler written out step by step, so that each step's Gaussian is in reach: the same
    arithmetic as diffusers' LCMScheduler.step (checked in the tests)."""

    def __init__(self, scheduler, steps: int, guidance: float, cond_dim: int):
        scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.alphas = scheduler.alphas_cumprod.float()
        self.kind = scheduler.config.prediction_type
        self.scheduler, self.guidance, self.cond_dim = scheduler, guidance, cond_dim

    def denoised(self, unet, x: torch.Tensor, t: int, ctx: torch.Tensor) -> torch.Tensor:
        from .diffusion import predicted_x0
        from .sampling import guidance_embedding

        w_emb = guidance_embedding(torch.full((len(x),), float(self.guidance)), self.cond_dim).to(x.dtype)
        pred = unet(x, torch.full((len(x),), t, dtype=torch.long), timestep_cond=w_emb, encoder_hidden_states=ctx).sample
        x0 = predicted_x0(self.kind, x, pred, self.alphas[t])
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(float(t)))
        return c_out * x0 + c_skip * x

    @torch.no_grad()
    def sample(self, unet, ctx: torch.Tensor, noise: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Final latents and the steps taken, (x, t, x', a') each; `noise()` gives each draw. The last
        step returns its estimate without noise, as LCMScheduler's does."""
        x, taken = noise(), []
        for t, t_next in zip(self.timesteps, self.timesteps[1:]):
            a_next = self.alphas[t_next]
            x_next = a_next.sqrt() * self.denoised(unet, x, t, ctx) + (1 - a_next).sqrt() * noise()
            taken.append((x, t, x_next, a_next))
            x = x_next
        return self.denoised(unet, x, self.timesteps[-1], ctx), taken

    def log_prob(self, unet, step, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample log-probability of one step (mean over the latent's elements, constants
        dropped), and the denoised estimate it came from."""
        x, t, x_next, a_next = step
        d = self.denoised(unet, x, t, ctx)
        return -((x_next - a_next.sqrt() * d) ** 2).mean((1, 2, 3)) / (2 * (1 - a_next)), d


def few_step_policy(pipe, steps: int | None = None, guidance: float | None = None) -> FewStepPolicy:
    """The model's own few-step sampler (LCM, its default steps and guidance unless given) as a policy."""
    from .pipeline import make_scheduler

    fast = pipe.settings("", scheduler="LCM", steps=steps, guidance=guidance)
    return FewStepPolicy(make_scheduler("LCM", pipe.scheduler_config), fast.steps, fast.guidance,
                         pipe.fast_unet.config.time_cond_proj_dim)


class WithTower(torch.nn.Module):
    """The few-step UNet with the text tower beside it, so that both train as one module; called, it
    is the UNet (the losses encode the prompts through `text_encoder` themselves)."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


class PolicyLoss:
    """One update: `prompts` prompts drawn `group` times each by the current UNet, judged, and the
    policy-gradient loss of their steps."""

    def __init__(self, pipe, cfg: TuneCfg, reward_fn: Callable | None = None, steps: int | None = None,
                 guidance: float | None = None):
        from .shapesworld.checker import parse_prompt

        self.pipe, self.cfg = pipe, cfg
        self.policy = few_step_policy(pipe, steps, guidance)
        self.reference = copy.deepcopy(pipe.fast_unet).eval().requires_grad_(False) if cfg.kl > 0 else None
        # with the tower training along, the reference reads the starting tower's states
        self.reference_tower = (copy.deepcopy(pipe.text_encoder).eval().requires_grad_(False)
                                if cfg.tower_lr > 0 else None)
        self.reward_fn = reward_fn or (lambda image, prompt: verdict_reward(image, prompt, cfg.partial))
        drawn = training_prompts(random.Random(f"sfumato-tune/{cfg.seed}"), 4096, cfg.categories, cfg.held_out_seeds)
        self.prompts = [p for _, p in drawn]
        self.categories = [c for c, _ in drawn]
        self.specs = [parse_prompt(p) for p in self.prompts]
        shape = pipe.fast_unet.config
        self.latent_shape = (shape.in_channels, shape.sample_size, shape.sample_size)

    def __call__(self, model, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        batch = self.draw(model, g)
        loss, kl = self.objective(model, batch)
        reach, reached = self.reach_loss(model, batch)
        return loss + reach, {**batch.stats(), "kl": kl, "live": len(batch.live) / len(batch.advantages), **reached}

    def reach_loss(self, model, batch: "Drawn") -> tuple[torch.Tensor, dict]:
        """The text tower asked to carry each prompt's relation into the words after it: their states
        should change by `reach_target` (relative) when the relation flips, as they do when a colour
        changes; weighted by `reach`. A causal tower otherwise folds "left of" into nothing that
        follows it (round 14 of docs/recipe.md), and the object words cannot say their side."""
        from .text_reach import reach_loss

        if self.cfg.reach <= 0 or not isinstance(model, WithTower):
            return torch.zeros(()), {}
        loss, mean = reach_loss(self.pipe.tokenizer, model.text_encoder, batch.prompts or [], self.cfg.reach_target)
        return self.cfg.reach * loss, ({} if math.isnan(mean) else {"reach": mean})  # NaN: no relation prompt drawn

    def draw(self, model, g: torch.Generator) -> "Drawn":
        """Sample `prompts` prompts `group` times each with the current UNet, and judge the images."""
        from .sampling import decode_latents, encode_prompts

        cfg = self.cfg
        pick = torch.randint(len(self.prompts), (cfg.prompts,), generator=g).tolist()
        specs = [self.specs[i] for i in pick for _ in range(cfg.group)]
        prompts = [self.prompts[i] for i in pick for _ in range(cfg.group)]
        ctx = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts).float()  # no grad
        axes = mirror_axes([self.specs[i] for i in pick])
        draws = []  # every noise draw, the starting latents first

        def noise() -> torch.Tensor:
            if cfg.mirror:
                draws.append(antithetic_noise(self.latent_shape, axes, cfg.group, g))
            else:
                draws.append(torch.randn((len(specs), *self.latent_shape), generator=g))
            return draws[-1]

        was_training = model.training
        model.eval()
        latents, taken = self.policy.sample(model, ctx, noise)
        model.train(was_training)
        images = decode_latents(self.pipe.vae, latents).numpy()
        judged = [self.reward_fn(img, s) for img, s in zip(images, specs)]
        rewards = torch.tensor([r for r, _ in judged], dtype=torch.float32).view(cfg.prompts, cfg.group)
        return Drawn(ctx, taken, rewards, group_advantages(rewards).flatten(), [ok for _, ok in judged],
                     latents, draws, images, specs, [self.categories[i] for i in pick for _ in range(cfg.group)],
                     prompts)

    def context(self, model, batch: "Drawn") -> torch.Tensor:
        """The samples' text states: as drawn, or encoded again through a tower that trains along."""
        from .sampling import prompt_ids

        if isinstance(model, WithTower):
            return model.text_encoder(prompt_ids(self.pipe.tokenizer, batch.prompts))[0].float()
        return batch.ctx

    @torch.no_grad()
    def reference_context(self, batch: "Drawn") -> torch.Tensor:
        """The text states the frozen reference UNet reads: the starting tower's."""
        from .sampling import encode_prompts

        if self.reference_tower is None:
            return batch.ctx
        return encode_prompts(self.pipe.tokenizer, self.reference_tower, batch.prompts).float()

    def objective(self, model, batch: "Drawn") -> tuple[torch.Tensor, float]:
        """Minus the advantage-weighted log-probability of every step the samples took (plus the KL
        term), per sample of the batch; and the mean KL."""
        n, live, kl_total = len(batch.advantages), batch.live, 0.0
        if not len(live):  # every group judged all alike: nothing to learn, a zero step
            return sum(p.sum() * 0 for p in model.parameters()), 0.0
        loss, ctx = torch.zeros(()), self.context(model, batch)[live]
        ctx_ref = self.reference_context(batch)[live] if self.reference is not None else None
        for x, t, x_next, a_next in batch.taken:
            step = (x[live], t, x_next[live], a_next)
            logp, d = self.policy.log_prob(model, step, ctx)
            loss = loss - (batch.advantages[live] * logp).sum() / n
            if self.reference is not None:
                with torch.no_grad():
                    d_ref = self.policy.denoised(self.reference, step[0], t, ctx_ref)
                kl = (a_next * (d - d_ref) ** 2).mean((1, 2, 3)) / (2 * (1 - a_next))
                loss = loss + self.cfg.kl * kl.sum() / n
                kl_total += kl.mean().item()
        return loss, kl_total


class RepairLoss(PolicyLoss):
    """One update of preference tuning on repaired samples (Diffusion-DPO, Wallace et al. 2023): the
    same draws as the policy gradient; each sample that failed is paired with a better one, and the
    UNet is trained to denoise the better one more easily than the starting UNet does, and the worse
    one less easily.

    - A sample with its objects right and its relation wrong is paired with its repair (the nearest
      render that holds the relation, `shapesworld.repair`) along the same noise draws.
    - Any other failed sample is paired with a passing sample of its group, when there is one.

    Why: where the objects go is decided by the first step, from the starting noise, which is not a
    Gaussian draw of the policy, so the policy gradient gives it no credit (round 13 of
    docs/recipe.md: position held while digits, decided late, rose). A repair shares the failed
    sample's starting noise, so at the first step the pair differs only in where the objects lie,
    and the preference asks the first estimate to move them there. Regressing on the repairs
    instead blurs that estimate towards the mean of every outcome and drops objects (round 14); the
    preference's pull is the difference of the pair, with no pull towards a mean. Step k of a sample
    is taken at the latent the sampler would have reached had every earlier estimate been that
    sample: sqrt(a_k) * latent + sqrt(1 - a_k) * (its own k-th noise draw); each update trains the
    first step and one other drawn at random."""

    def __init__(self, pipe, cfg: TuneCfg, reward_fn: Callable | None = None, steps: int | None = None,
                 guidance: float | None = None):
        super().__init__(pipe, cfg, reward_fn, steps, guidance)
        if self.reference is None:
            self.reference = copy.deepcopy(pipe.fast_unet).eval().requires_grad_(False)

    def __call__(self, model, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        batch = self.draw(model, g)
        (z_win, rows_win), (z_lose, rows_lose), repaired = self.pairs(batch)
        n = len(rows_win)
        stats = {**batch.stats(), "repaired": repaired / len(batch.passed), "pairs": n / len(batch.passed)}
        reach, reached = self.reach_loss(model, batch)
        stats.update(reached)
        if not n:
            return reach + sum(p.sum() * 0 for p in model.parameters()), stats
        later = len(self.policy.timesteps) - 1
        steps = [0] + ([1 + int(torch.randint(later, (1,), generator=g))] if later else [])
        z, rows = torch.cat([z_win, z_lose]), torch.cat([rows_win, rows_lose])
        ctx, ctx_ref = self.context(model, batch)[rows], self.reference_context(batch)[rows]
        loss, margin = torch.zeros(()), 0.0
        for k in steps:
            t = self.policy.timesteps[k]
            a = self.policy.alphas[t]
            x = a.sqrt() * z + (1 - a).sqrt() * batch.noises[k][rows]
            err = ((self.policy.denoised(model, x, t, ctx) - z) ** 2).mean((1, 2, 3))
            with torch.no_grad():
                err_ref = ((self.policy.denoised(self.reference, x, t, ctx_ref) - z) ** 2).mean((1, 2, 3))
            gain = err - err_ref  # how much more easily than the starting UNet (negative: more easily)
            diff = gain[:n] - gain[n:]
            loss = loss - torch.nn.functional.logsigmoid(-self.cfg.beta * diff).mean()
            margin += (-diff).mean().item()
        return loss / len(steps) + reach, {**stats, "margin": margin / len(steps)}

    @torch.no_grad()
    def pairs(self, batch: "Drawn") -> tuple[tuple, tuple, int]:
        """(better latents, their rows), (worse latents, their rows), and how many pairs are repairs."""
        from .sampling import encode_images
        from .shapesworld.checker import parse_image
        from .shapesworld.repair import repair_relation

        group = self.cfg.group
        win, lose, renders = [], [], {}
        for i, (image, spec_, ok) in enumerate(zip(batch.images, batch.specs, batch.passed)):
            if ok:
                continue
            if spec_.relation is not None and (fixed := repair_relation(parse_image(image), spec_)) is not None:
                renders[len(win)] = np.asarray(fixed)
                win.append(i)
                lose.append(i)
                continue
            first = i - i % group
            passing = [j for j in range(first, first + group) if batch.passed[j]]
            if passing:
                win.append(passing[i % len(passing)])
                lose.append(i)
        rows_win, rows_lose = torch.tensor(win, dtype=torch.long), torch.tensor(lose, dtype=torch.long)
        z_win = batch.latents[rows_win].clone()
        if renders:
            fixed = torch.from_numpy(np.stack(list(renders.values()))).permute(0, 3, 1, 2)
            z_win[list(renders)] = encode_images(self.pipe.vae, fixed).to(z_win.dtype)
        return (z_win, rows_win), (batch.latents[rows_lose], rows_lose), len(renders)


@dataclass
class Drawn:
    """One update's samples: text states, the steps taken, rewards (prompts, group), advantages
    (flat) and which passed."""

    ctx: torch.Tensor
    taken: list
    rewards: torch.Tensor
    advantages: torch.Tensor
    passed: list
    latents: torch.Tensor | None = None  # the final latents
    noises: list | None = None  # each step's noise draw, the starting latents first
    images: np.ndarray | None = None
    specs: list | None = None  # the parsed prompt of each sample
    categories: list | None = None  # the category of each sample's prompt
    prompts: list | None = None  # each sample's prompt

    def stats(self) -> dict:
        """Mean reward and pass rate, overall and (with more than one category) per category."""
        out = {"reward": self.rewards.mean().item(), "pass": float(np.mean(self.passed))}
        if self.categories and len(set(self.categories)) > 1:
            for c in sorted(set(self.categories)):
                out[f"pass_{c}"] = float(np.mean([ok for ok, k in zip(self.passed, self.categories) if k == c]))
        return out

    @property
    def live(self) -> torch.Tensor:
        """The samples whose advantage is not zero (a group judged all alike teaches nothing)."""
        return (self.advantages.abs() > 1e-6).nonzero()[:, 0]


# ---------------------------------------------------------------- the run


def tune(model: str | Path, out: str | Path | None, cfg: TuneCfg, in_place: bool = False, resume: bool = False,
         overwrite: bool = False, progress: bool = True, reward_fn: Callable | None = None) -> Path:
    """Tune the few-step UNet of the model folder `model`; write a copy of the folder to `out`, or
    (in_place) replace model/unet_lcm. Resumable from the target's .partial folder."""
    from .engine import Engine, StageSpec
    from .models import quiet_libraries
    from .pipeline import FAST_UNET, load
    from .train import _check_folders, partial_dir

    check(cfg)
    if in_place == (out is not None):
        raise UsageError("give either --out FOLDER (a tuned copy of the model) or --in-place")
    model = Path(model)
    sub = FAST_UNET if (model / FAST_UNET).is_dir() else "unet"  # a distilled folder's own UNet is unet/
    target = model / sub if in_place else Path(out)
    if not in_place and target.resolve() == model.resolve():
        raise UsageError("--out must be another folder than the model being tuned (or use --in-place)")
    work = partial_dir(target)
    _check_folders(None if in_place else target, work, resume, overwrite)  # in place: the UNet is replaced by design
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    pipe = load(model, device="cpu", onnx=False)
    if pipe.fast_unet is None:
        raise UsageError(f"{model} has no few-step UNet to tune; distil one first (sfumato distill {model} --attach)")
    if overwrite and not resume:
        shutil.rmtree(work, ignore_errors=True)
    unet = pipe.fast_unet.train().requires_grad_(True)  # the engine's optimiser takes this module's parameters only
    from .first_step import MeanLoss

    loss_fn = {"policy": PolicyLoss, "repair": RepairLoss, "mean": MeanLoss}[cfg.objective](pipe, cfg, reward_fn)
    if cfg.position_input:  # after the losses took their reference: that stays the UNet as it was
        from .stages import with_position_input

        unet = pipe.fast_unet = with_position_input(unet).train().requires_grad_(True)
    trained, lr_scales = unet, {}
    if cfg.tower_lr > 0:
        trained = WithTower(unet, pipe.text_encoder.train().requires_grad_(True))
        lr_scales = {"text_encoder.": cfg.tower_lr / cfg.lr} if cfg.lr > 0 else {}
    engine = Engine(work, cfg.seed, checkpoint_every=cfg.checkpoint_every, eval_every=10**9, log_every=5,
                    progress=progress)
    t0 = time.time()
    metrics = engine.run(StageSpec("tune", trained, loss_fn, cfg.steps, cfg.lr, cfg.warmup, cfg.prompts * cfg.group,
                                   lr_scales=lr_scales))
    record = {"config": {**asdict(cfg), "categories": list(cfg.categories)}, "seconds": round(time.time() - t0, 1),
              "steps_per_sample": len(loss_fn.policy.timesteps), "guidance": loss_fn.policy.guidance,
              "last": metrics}
    tower = pipe.text_encoder.eval() if cfg.tower_lr > 0 else None
    _publish(unet.eval(), model, sub, target, work, in_place, record, tower)
    return target


def _publish(unet, model: Path, sub: str, target: Path, work: Path, in_place: bool, record: dict,
             tower=None) -> None:
    """The tuned UNet (and a tower trained along) into place: model/unet_lcm itself, or a copy of the
    model folder (its ONNX export left out: it was made from the old weights)."""
    from .distill import _card
    from .files import atomic_write_text, publish_dir
    from .train import versions

    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    card = _card(model)
    card.setdefault("tuned", []).append({**record, "unet": sub, "versions": versions()})
    if in_place:
        unet.save_pretrained(work / "unet")
        if tower is not None:
            tower.save_pretrained(work / "text_encoder")
        publish_dir(work / "unet", target)
        if tower is not None:
            publish_dir(work / "text_encoder", model / "text_encoder")
        shutil.rmtree(work, ignore_errors=True)
        atomic_write_text(model / "sfumato.json", json.dumps(card, indent=1, default=str))
        return
    replaced = ("onnx", sub, "logs") + (("text_encoder",) if tower is not None else ())
    for part in model.iterdir():
        if part.name not in replaced and not part.name.endswith(".partial"):
            (shutil.copytree if part.is_dir() else shutil.copy2)(part, work / part.name)
    unet.save_pretrained(work / sub)
    if tower is not None:
        tower.save_pretrained(work / "text_encoder")
    (work / "sfumato.json").write_text(json.dumps(card, indent=1, default=str))  # logs/ stays: the run's metrics
    publish_dir(work, target)


__all__ = ["TuneCfg", "tune", "training_prompts", "verdict_reward", "group_advantages", "antithetic_noise",
           "FewStepPolicy", "PolicyLoss", "RepairLoss", "WithTower", "few_step_policy"]
