"""`sfumato train`: tokenizer, CLIP, VAE and UNet from paired data into a diffusers-layout folder.

    sfumato train --data data/shapes --out models/mine --preset tiny
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import out

app = typer.Typer()


@app.command("train")
def train_cmd(
    data: str = typer.Option(..., "--data", help='A folder or manifest of image-caption pairs, or "shapesworld".'),
    out_dir: Path = typer.Option(..., "--out", help="Model folder to write (diffusers layout)."),
    preset: str = typer.Option("small", "--preset", help="tiny | small | base."),
    stages: str = typer.Option("tokenizer,clip,vae,unet", "--stages", help="Comma-separated stages to run."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON config (sections data, clip, vae, unet, ...)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value: section.key=value."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Resume even if the data changed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model or unfinished run."),
) -> None:
    """Train the tokenizer, CLIP, VAE and UNet from paired data into a model folder."""
    from ..config import apply_overrides, get_preset, load_config
    from ..train import parse_stages, train

    cfg = load_config(config) if config else get_preset(preset)
    apply_overrides(cfg, list(set_ or ()))
    path = train(data, out_dir, cfg, parse_stages(stages), resume=resume, force=force, overwrite=overwrite,
                 overrides=list(set_ or ()))
    out.print(f"model: {path}")
