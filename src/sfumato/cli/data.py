"""`sfumato data`: make and inspect paired data sets.

    sfumato data shapes --n 1000 --out data/shapes
    sfumato data check data/shapes --scenes
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .console import console, out

app = typer.Typer(help="Make and inspect paired data sets.", no_args_is_help=True)


@app.command("shapes")
def data_shapes(
    out_dir: Path = typer.Option(..., "--out", help="Folder to write (must be empty or new)."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same data set."),
    res: int = typer.Option(64, "--res", help="Image side in pixels (geometry scales by res/64)."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Generate a ShapesWorld data set: PNG + caption + scene record per image, and manifest.jsonl."""
    from ..shapesworld import write_dataset

    summary = write_dataset(out_dir, n, seed, res, tuple(category or ()) or None, overwrite, progress=True)
    out.print(f"wrote {summary['n']} images ({res}x{res}, seed {seed}) to {out_dir}")
    for name, count in summary["categories"].items():
        out.print(f"  {name:<18} {count}")


IMAGE_COLUMN_HELP = "The manifest's image path column (default: image, file or file_name)."
CAPTION_COLUMN_HELP = "The manifest's caption column (default: caption or text)."


@app.command("check")
def data_check(
    source: Path = typer.Argument(..., help="A folder of images with .txt captions, a Hugging Face imagefolder "
                                  "(metadata.jsonl/.csv), or a .jsonl/.csv manifest."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first problem instead of skipping it."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", help="Refuse images with more pixels than this."),
    scenes: bool = typer.Option(False, "--scenes", help="Also judge each image against its caption with the "
                                "ShapesWorld scene checker."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help=IMAGE_COLUMN_HELP),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help=CAPTION_COLUMN_HELP),
) -> None:
    """Count pairs, image sizes and caption lengths, and list every problem; no usable pair is an error."""
    from ..pairs import PairSource, check_source, format_report, require_pairs

    src = PairSource(source, image_column, caption_column)
    report = check_source(src, strict=strict, max_pixels=max_pixels, progress=not as_json)
    summary = report.summary()
    if scenes:
        summary["scenes"] = _judge_pairs(report.pairs)
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        require_pairs(report, src)
        return
    for line in format_report(report):
        out.print(line, highlight=False)
    require_pairs(report, src)
    if scenes:
        s = summary["scenes"]
        out.print(f"scene checker: {s['passed']}/{s['total']} conform to their captions")
        for r in s["failures"][:20]:
            out.print(f"  {r['path']}: {r['reason']}", highlight=False)


def _judge_pairs(pairs) -> dict:
    from rich.progress import track

    from ..pairs import open_image
    from ..shapesworld.checker import judge

    failures = []
    for p in track(pairs, description="judging scenes", console=console):
        try:
            verdict = judge(open_image(p.path), p.caption)
        except ValueError as e:  # caption outside the ShapesWorld grammar
            failures.append({"path": str(p.path), "reason": str(e)})
            continue
        if not verdict.passed:
            failures.append({"path": str(p.path), "reason": verdict.reason})
    return {"total": len(pairs), "passed": len(pairs) - len(failures), "failures": failures}
