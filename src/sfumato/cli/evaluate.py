"""`sfumato eval`: measure what a model gets right.

    sfumato eval compositional --out eval/ --per-category 20
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import GenerationSettings as S
from ..errors import UsageError
from .console import out

app = typer.Typer(help="Measure what a model gets right.", no_args_is_help=True)


@app.command("compositional")
def eval_compositional(
    out_dir: Path = typer.Option(..., "--out", help="Folder for results.json, verdicts.jsonl, grids and images."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: shipped model)."),
    per_category: int = typer.Option(50, "--per-category", help="Prompts per category."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and images."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Sampler steps (default: the model's, else {S.steps})."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale (default: the model's, else "
                                             f"{S.guidance:g})."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=f"Sampler name (default: the model's, else "
                                            f"{S.scheduler})."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
    layout_search: int = typer.Option(S.layout_search, "--layout-search", help="Candidate noises for prompts that "
                                      "name a relation (as `generate`); 0: single samples, the model's own layouts."),
    mean_prior: Optional[float] = typer.Option(None, "--mean-prior", help="Gain of the model's mean prior (as "
                                               "`generate`; default: the model's own); 0: off."),
) -> None:
    """Generate prompts of every GenEval-style category and judge each image with the scene checker."""
    from ..evaluate import evaluate_compositional
    from ..pipeline import load
    from ..shapesworld import spec

    cats = tuple(category or spec.CATEGORIES)
    bad = [c for c in cats if c not in spec.CATEGORIES]
    if bad:
        raise UsageError(f"unknown category {bad[0]!r}; choose from {', '.join(spec.CATEGORIES)}")
    if not 1 <= per_category <= 10_000:
        raise UsageError(f"--per-category must be between 1 and 10000, got {per_category}")
    pipe = load(model)
    r = evaluate_compositional(pipe, out_dir, per_category, seed, steps, guidance, scheduler, cats,
                               layout_search=layout_search, mean_prior=mean_prior)
    out.print(f"overall {r['overall']:.3f}  ({per_category} prompts per category, {r['seconds_per_image']:.2f} s/image)")
    for c, rate in r["per_category"].items():
        out.print(f"  {c:<18} {rate:.3f}")
    out.print(f"results: {out_dir / 'results.json'}")
