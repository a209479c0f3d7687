"""`sfumato distill`: a model folder into a few-step (LCM) one that samples in 2-8 steps.

    sfumato distill models/mine --out models/mine-fast --steps 250
    sfumato distill models/mine --attach     # into models/mine/unet_lcm: few steps by default
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import out

app = typer.Typer()


@app.command("distill")
def distill_cmd(
    model: Path = typer.Argument(..., help="The model folder to distil (diffusers Stable Diffusion layout)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="The few-step model folder to write."),
    attach: bool = typer.Option(False, "--attach", help="Write the few-step UNet into MODEL itself (MODEL/unet_lcm): "
                                "MODEL then samples in a few steps by default and keeps its other samplers."),
    steps: int = typer.Option(250, "--steps", help="Distillation steps (batches of 32); the default model "
                              "scored best at 250 and worse with more (docs/speed.md)."),
    data: str = typer.Option("shapesworld", "--data", help='Pairs whose images and captions it learns on.'),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr"),
    pairs: int = typer.Option(30_000, "--pairs", help='ShapesWorld pairs when --data is "shapesworld".'),
    seed: int = typer.Option(0, "--seed", help="Seed of the batches, noise and guidance scales drawn."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run from its last checkpoint."),
    init: Optional[Path] = typer.Option(None, "--init", help="Go on from an earlier distilled UNet of this model "
                                        "(e.g. MODEL/unet_lcm, with --attach --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder or unfinished run."),
    reward_weight: float = typer.Option(0.0, "--reward-weight", help="Also train through the few-step sampler on "
                                        "ShapesWorld relation prompts with this weight (0 = off; docs/recipe.md)."),
    reward_batch: int = typer.Option(8, "--reward-batch", help="Relation prompts drawn per step for the reward."),
    reward_every_step: bool = typer.Option(False, "--reward-every-step", help="Score every sampler step's estimate "
                                           "of the image, not only the image."),
    reward_target: str = typer.Option("pixels", "--reward-target", help="What the reward scores: pixels (the "
                                      "decoded image) or attention (the two words' maps after half the steps)."),
) -> None:
    """Distil a model into a few-step one (latent consistency distillation onto LCMScheduler)."""
    from ..distill import DistillCfg, distill

    path = distill(model, out_dir, DistillCfg(steps=steps, batch_size=batch_size, lr=lr, pairs=pairs, seed=seed,
                                                reward_weight=reward_weight, reward_batch=reward_batch,
                                                reward_every_step=reward_every_step, reward_target=reward_target),
                   data,
                   resume=resume, overwrite=overwrite, attach=attach, init=init)
    out.print(f"few-step UNet carried in {path}" if attach else f"few-step model: {path}")
