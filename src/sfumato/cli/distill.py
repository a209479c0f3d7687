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
) -> None:
    """Distil a model into a few-step one (latent consistency distillation onto LCMScheduler)."""
    from ..distill import DistillCfg, distill

    path = distill(model, out_dir, DistillCfg(steps=steps, batch_size=batch_size, lr=lr, pairs=pairs, seed=seed), data,
                   resume=resume, overwrite=overwrite, attach=attach, init=init)
    out.print(f"few-step UNet carried in {path}" if attach else f"few-step model: {path}")
