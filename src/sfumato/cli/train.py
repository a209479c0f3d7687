"""`sfumato train`: tokenizer, CLIP, VAE and UNet from paired data into a diffusers-layout folder.

    sfumato train --data data/shapes --out models/mine --preset tiny
    sfumato train --list-keys                     # every --set key with its default and range
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .console import out
from .data import CAPTION_COLUMN_HELP, IMAGE_COLUMN_HELP

app = typer.Typer()


def config_keys() -> list[dict]:
    """Every training config key: its default (before a preset), range, the presets that change it,
    and the comment beside it in config.py."""
    import dataclasses
    import inspect
    import re

    from .. import config as c

    rows = []

    def walk(obj, prefix: str) -> None:
        source = inspect.getsource(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            key = prefix + f.name
            note = re.search(rf"^\s+{f.name}:[^#\n]*#\s*(.+)$", source, re.MULTILINE)
            rows.append({"key": key, "default": value, "range": c.RANGES.get(key),
                         "presets": {name: p[key] for name, p in c.PRESETS.items() if key in p},
                         "note": note.group(1).strip() if note else ""})

    walk(c.TrainCfg(), "")
    return rows


def print_config_keys() -> None:
    """One line per key: `key = default  [low, high]  presets: ...  # note`."""
    for r in config_keys():
        parts = [f"{r['key']} = {r['default']!r}"]
        if r["range"] is not None:
            low, high = (v if isinstance(v, int) else f"{v:g}" for v in r["range"])
            parts.append(f"[{low} to {high}]")
        if r["presets"]:
            parts.append("presets: " + ", ".join(f"{k} {v!r}" for k, v in r["presets"].items()))
        if r["note"]:
            parts.append(f"# {r['note']}")
        out.print("  ".join(parts), highlight=False, markup=False, soft_wrap=True)


def _list_keys(value: bool) -> None:
    if value:
        print_config_keys()
        raise typer.Exit()


@app.command("train")
def train_cmd(
    data: str = typer.Option(..., "--data", help='A folder or manifest of image-caption pairs (Hugging Face '
                             'imagefolders too), or "shapesworld".'),
    out_dir: Path = typer.Option(..., "--out", help="Model folder to write (diffusers layout)."),
    preset: str = typer.Option("small", "--preset", help="tiny | small | base."),
    stages: str = typer.Option("tokenizer,clip,vae,unet", "--stages", help="Comma-separated stages to run."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON config (sections data, clip, vae, unet, ...)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value: section.key=value."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Resume even if the data changed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model or unfinished run."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help=IMAGE_COLUMN_HELP),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help=CAPTION_COLUMN_HELP),
    sample_prompts: Optional[Path] = typer.Option(None, "--sample-prompts", help="A file of prompts, one a line, "
                                                  "for the sample grids (default: held-out captions of the data)."),
    list_keys: bool = typer.Option(False, "--list-keys", callback=_list_keys, is_eager=True,
                                   help="List every config key (for --set) with its default and range, and exit."),
) -> None:
    """Train the tokenizer, CLIP, VAE and UNet from paired data into a model folder."""
    from ..config import apply_overrides, get_preset, load_config
    from ..pairs import PairSource
    from ..train import parse_stages, train

    cfg = load_config(config) if config else get_preset(preset)
    apply_overrides(cfg, list(set_ or ()))
    if sample_prompts is not None:
        from ..generate import read_prompts

        cfg.sample_prompts = tuple(read_prompts(sample_prompts))
    source = PairSource(data, image_column, caption_column) if image_column or caption_column else data
    with one_line_warnings():
        path = train(source, out_dir, cfg, parse_stages(stages), resume=resume, force=force, overwrite=overwrite,
                     overrides=list(set_ or ()))
    out.print(f"model: {path}")


@contextmanager
def one_line_warnings():
    """Warnings (captions cut at the context, say) as one `warning:` line each, when they happen,
    instead of Python's file:line report with its source line. Only the format changes: filters and
    recorders (pytest.warns, catch_warnings(record=True)) see the same warnings."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before
