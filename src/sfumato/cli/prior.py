"""`sfumato prior`: fit a model's mean prior, which moves the few-step sampler's first estimate to where
the training pairs put things for such a caption (sfumato.mean_prior).

    sfumato prior models/mine                    # on ShapesWorld pairs, into models/mine/mean_prior
    sfumato prior models/mine --data pairs/ --gain 4 --overwrite
"""

from __future__ import annotations

from pathlib import Path

import typer

from .console import out

app = typer.Typer()


@app.command("prior")
def prior_cmd(
    model: Path = typer.Argument(..., help="A model folder with a few-step UNet (made by `sfumato distill`)."),
    data: str = typer.Option("shapesworld", "--data", help="Pairs whose images and captions it learns from."),
    pairs: int = typer.Option(16_000, "--pairs", help='ShapesWorld pairs when --data is "shapesworld".'),
    mix: str = typer.Option("", "--mix", help='ShapesWorld category shares, e.g. "position=8" (half the pairs '
                            'name a relation; others keep 1 share each).'),
    steps: int = typer.Option(3000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    gain: float = typer.Option(4.0, "--gain", help="The model's default gain (`generate --mean-prior`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noises and batches."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the model's mean prior."),
) -> None:
    """Fit the mean prior of a few-step model on its pairs (into MODEL/mean_prior)."""
    from ..mean_prior import FOLDER, fit_into

    r = fit_into(model, data, pairs, steps, batch_size, lr, gain, seed, overwrite, mix=mix)
    part, name = ("held_mse", "held-out") if "held_mse" in r else ("train_mse", "training")  # few pairs: none held
    out.print(f"mean prior: {Path(model) / FOLDER} (gain {gain:g}; {name} error {r[part]:.4f} against "
              f"{r[part + '_zero']:.4f} for none, {r['seconds']:.0f} s)")
