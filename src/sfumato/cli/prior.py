"""`sfumato prior`: fit a model's mean prior, which moves the few-step sampler's first estimate to where
the training pairs put things for such a caption (sfumato.mean_prior).

    sfumato prior models/mine                    # on ShapesWorld pairs and relation variants
    sfumato prior models/mine --data pairs/ --gain 4 --overwrite
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import MEAN_PRIOR_GAIN, MEAN_PRIOR_RELATIONS, MEAN_PRIOR_STEPS
from .console import out

app = typer.Typer()


@app.command("prior")
def prior_cmd(
    model: Path = typer.Argument(..., help="A model folder with a few-step UNet (made by `sfumato distill`)."),
    data: str = typer.Option("shapesworld", "--data", help="Pairs whose images and captions it learns from."),
    pairs: int = typer.Option(16_000, "--pairs", help='ShapesWorld pairs when --data is "shapesworld" (with '
                              "relations: captions that name none, on which the prior learns to stay at zero)."),
    mix: str = typer.Option("", "--mix", help='ShapesWorld category shares, e.g. "position=8" (half the pairs '
                            'name a relation; others keep 1 share each).'),
    relations: Optional[int] = typer.Option(
        None, "--relations", help="ShapesWorld position prompts drawn under each relation, whose contrast the "
        f"prior learns (the pairs alone teach none); default {MEAN_PRIOR_RELATIONS:,} with ShapesWorld pairs, else 0."),
    relation_weight: float = typer.Option(10.0, "--relation-weight", help="Weight of the relation contrast."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: "
                                        f"{MEAN_PRIOR_STEPS['relations']:,} with relations, else {MEAN_PRIOR_STEPS['plain']:,})."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    gain: Optional[float] = typer.Option(None, "--gain", help="The model's default gain (`generate --mean-prior`; "
                                         f"default {MEAN_PRIOR_GAIN['relations']:g} with relations, else "
                                         f"{MEAN_PRIOR_GAIN['plain']:g})."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noises and batches."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the model's mean prior."),
) -> None:
    """Fit the mean prior of a few-step model (into MODEL/mean_prior): on ShapesWorld, the relation's
    contrast over prompts that differ only in it; on other pairs, the plain mean."""
    from ..mean_prior import FOLDER, fit_into

    r = fit_into(model, data, pairs, steps, batch_size, lr, gain, seed, overwrite, mix=mix, relations=relations,
                 weight=relation_weight)
    if "held_contrast_mse" in r:
        part, name = "held_contrast_mse", "held-out relation contrast"
    else:  # few pairs: none held out
        part, name = ("held_mse", "held-out") if "held_mse" in r else ("train_mse", "training")
    out.print(f"mean prior: {Path(model) / FOLDER} (gain {r['gain']:g}; {name} error {r[part]:.4f} against "
              f"{r[part + '_zero']:.4f} for none, {r['seconds']:.0f} s)")
