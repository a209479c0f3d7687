"""The `sfumato` command: one verb per job; each verb parses its options and calls the library.

    sfumato data shapes --n 1000 --out data/shapes
    sfumato data check data/shapes
    sfumato train --data data/shapes --out models/mine --preset tiny
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from . import __version__
from .errors import SfumatoError, UsageError

app = typer.Typer(help="Learn, generate, search and explain images from paired data.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Make and inspect paired data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Measure what a model gets right.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

try:  # newer typer releases ship their own copy of click
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover
    _typer_click = click.exceptions
USAGE_ERRORS = (click.exceptions.UsageError, _typer_click.UsageError)
ABORTS = (click.exceptions.Abort, getattr(_typer_click, "Abort", click.exceptions.Abort), KeyboardInterrupt)

# soft_wrap: a one-line error stays one line when stderr is a pipe or a narrow terminal.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"sfumato {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["verbose"] = verbose


# ---------------------------------------------------------------- data


@data_app.command("shapes")
def data_shapes(
    out_dir: Path = typer.Option(..., "--out", help="Folder to write (must be empty or new)."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same data set."),
    res: int = typer.Option(64, "--res", help="Image side in pixels (geometry scales by res/64)."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Generate a ShapesWorld data set: PNG + caption + scene record per image, and manifest.jsonl."""
    from .shapesworld import write_dataset

    summary = write_dataset(out_dir, n, seed, res, tuple(category or ()) or None, overwrite, progress=True)
    out.print(f"wrote {summary['n']} images ({res}x{res}, seed {seed}) to {out_dir}")
    for name, count in summary["categories"].items():
        out.print(f"  {name:<18} {count}")


@data_app.command("check")
def data_check(
    source: Path = typer.Argument(..., help="A folder of images with .txt captions, or a .jsonl/.csv manifest."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first problem instead of skipping it."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", help="Refuse images with more pixels than this."),
    scenes: bool = typer.Option(False, "--scenes", help="Also judge each image against its caption with the "
                                "ShapesWorld scene checker."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Count pairs, image sizes and caption lengths, and list every problem."""
    from .pairs import check_source, format_report

    report = check_source(source, strict=strict, max_pixels=max_pixels, progress=not as_json)
    summary = report.summary()
    if scenes:
        summary["scenes"] = _judge_pairs(report.pairs)
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    for line in format_report(report):
        out.print(line, highlight=False)
    if scenes:
        s = summary["scenes"]
        out.print(f"scene checker: {s['passed']}/{s['total']} conform to their captions")
        for r in s["failures"][:20]:
            out.print(f"  {r['path']}: {r['reason']}", highlight=False)


def _judge_pairs(pairs) -> dict:
    from rich.progress import track

    from .pairs import open_image
    from .shapesworld.checker import judge

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


# ---------------------------------------------------------------- train


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
    from .config import apply_overrides, get_preset, load_config
    from .train import parse_stages, train

    cfg = load_config(config) if config else get_preset(preset)
    apply_overrides(cfg, list(set_ or ()))
    path = train(data, out_dir, cfg, parse_stages(stages), resume=resume, force=force, overwrite=overwrite,
                 overrides=list(set_ or ()))
    out.print(f"model: {path}")


# ---------------------------------------------------------------- generate


def _list_schedulers(value: bool) -> None:
    if value:
        from .pipeline import DEFAULT_SCHEDULER, SCHEDULERS

        for name, (cls, kw) in SCHEDULERS.items():
            extra = ", ".join(f"{k}={v}" for k, v in kw.items())
            mark = " (default)" if name == DEFAULT_SCHEDULER else ""
            out.print(f"{name:<16} {cls}{f' ({extra})' if extra else ''}{mark}", highlight=False)
        raise typer.Exit()


def _parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return (int(w), int(h or w))
    except ValueError:
        raise UsageError(f"--size must be N or WxH in pixels, got {text!r}") from None


@app.command("generate")
def generate_cmd(
    prompt: Optional[str] = typer.Argument(None, help="What to draw."),
    model: Optional[Path] = typer.Option(None, "--model", help="Diffusers Stable Diffusion folder (default: shipped model)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed + i."),
    num_images: int = typer.Option(1, "-n", "--num-images", help="Images per prompt."),
    steps: int = typer.Option(20, "--steps", help="Sampler steps."),
    guidance: float = typer.Option(4.0, "--guidance", help="Classifier-free guidance scale (1 disables)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    scheduler: str = typer.Option("DPM++ 2M", "--scheduler", help="Sampler name (see --list-schedulers)."),
    size: str = typer.Option("", "--size", help="N or WxH pixels (default: the model's native size)."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Start from this image (img2img)."),
    strength: float = typer.Option(0.75, "--strength", help="img2img: how much of the schedule to re-run (0-1)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask (white = repaint), same size as --init-image."),
    out_path: Path = typer.Option(Path("outputs"), "--out", help="A .png file or a folder."),
    grid: bool = typer.Option(False, "--grid", help="Also write a contact sheet of all images."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A file of prompts, one a line; writes index.jsonl."),
    list_schedulers: bool = typer.Option(False, "--list-schedulers", callback=_list_schedulers, is_eager=True,
                                         help="List sampler names and exit."),
    explain: bool = typer.Option(False, "--explain", help="Also write per-word attention maps: IMAGE.words.png, "
                                 "IMAGE.maps.npz."),
    audit: bool = typer.Option(False, "--audit", help="Say word by word whether each image shows its prompt."),
    neighbours: int = typer.Option(0, "--neighbours", help="List this many nearest images of --index and a "
                                   "novelty score (1 - max cosine)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index over the training set, for --neighbours."),
) -> None:
    """Generate images from a text prompt with the shipped default model or any diffusers SD folder."""
    import warnings

    from . import generate as gen
    from .pairs import open_image
    from .pipeline import load

    if prompts is None and not prompt:
        raise UsageError("give a PROMPT or --prompts FILE")
    if prompts is not None and prompt:
        raise UsageError("give either a PROMPT or --prompts FILE, not both")
    texts = gen.read_prompts(prompts) if prompts else [prompt]
    kw = dict(steps=steps, guidance=guidance, negative=negative, scheduler=scheduler,
              size=_parse_size(size) if size else 0)
    if init_image is not None:
        kw.update(init_image=open_image(init_image), strength=strength)
        if mask is not None:
            kw["mask"] = open_image(mask)
    elif mask is not None:
        raise UsageError("--mask needs --init-image")
    if neighbours < 0:
        raise UsageError(f"--neighbours must be 0 or more, got {neighbours}")
    if (neighbours > 0) != (index is not None):
        raise UsageError("--neighbours K and --index INDEX go together")
    pipe = load(model)
    after = _after_image(pipe, audit, neighbours, index) if (audit or neighbours) else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = gen.run(pipe, texts, out_path, num_images, seed, grid, batch=prompts is not None,
                        explain=explain, after=after, **kw)
    for w in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
        console.print(f"warning: {w}", highlight=False, markup=False)
    for p in paths:
        out.print(str(p), highlight=False)


def _after_image(pipe, audit: bool, k: int, index):
    """Per-image reports for generate: an adherence audit and/or the nearest indexed images."""
    from .cli_explain import _embedder_or_none, print_audit
    from .explain import audit as audit_image
    from .explain import neighbours

    emb = _embedder_or_none(pipe.folder)
    if k and emb is None:
        raise UsageError(f"--neighbours needs a model with a CLIP (clip/), and {pipe.folder} has none")
    if k:
        from .index import open_index
        from .search import check_model

        check_model(open_index(index).manifest, emb, index)  # before any image is drawn

    def after(img, prompt, path):
        if audit:
            print_audit(audit_image(img, prompt, pipe=pipe, embedder=emb), title=f"{path}: {prompt!r}")
        if k:
            hits, novelty = neighbours(index, emb, img, k)
            out.print(f"{path}: novelty {novelty:.3f} (1 - max cosine to {index})", highlight=False)
            for h in hits:
                out.print(f"  {h.score:.3f} {h.path}  {h.caption or ''}", highlight=False, markup=False)
        return []

    return after


@app.command("info")
def info_cmd(image: Path = typer.Argument(..., help="A PNG written by sfumato or AUTOMATIC1111.")) -> None:
    """Print the generation parameters stored in an image."""
    from .images import read_parameters

    out.print(read_parameters(image), highlight=False, markup=False)


# ---------------------------------------------------------------- eval


@eval_app.command("compositional")
def eval_compositional(
    out_dir: Path = typer.Option(..., "--out", help="Folder for results.json, verdicts.jsonl, grids and images."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: shipped model)."),
    per_category: int = typer.Option(50, "--per-category", help="Prompts per category."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and images."),
    steps: int = typer.Option(20, "--steps", help="Sampler steps."),
    guidance: float = typer.Option(4.0, "--guidance", help="Classifier-free guidance scale."),
    scheduler: str = typer.Option("DPM++ 2M", "--scheduler", help="Sampler name."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
) -> None:
    """Generate prompts of every GenEval-style category and judge each image with the scene checker."""
    from .evaluate import evaluate_compositional
    from .pipeline import load
    from .shapesworld import spec

    cats = tuple(category or spec.CATEGORIES)
    bad = [c for c in cats if c not in spec.CATEGORIES]
    if bad:
        raise UsageError(f"unknown category {bad[0]!r}; choose from {', '.join(spec.CATEGORIES)}")
    if not 1 <= per_category <= 10_000:
        raise UsageError(f"--per-category must be between 1 and 10000, got {per_category}")
    pipe = load(model)
    r = evaluate_compositional(pipe, out_dir, per_category, seed, steps, guidance, scheduler, cats)
    out.print(f"overall {r['overall']:.3f}  ({per_category} prompts per category, {r['seconds_per_image']:.2f} s/image)")
    for c, rate in r["per_category"].items():
        out.print(f"  {c:<18} {rate:.3f}")
    out.print(f"results: {out_dir / 'results.json'}")


from .cli_explain import register as _register_explain  # noqa: E402
from .cli_search import register as _register_search  # noqa: E402
from .cli_serve import register as _register_serve  # noqa: E402

_register_search(app)
_register_explain(app)
_register_serve(app)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line (exit 2 usage, 1 failure), -v shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        rv = app(args=argv, prog_name="sfumato", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except USAGE_ERRORS as e:
        ctx = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
        console.print(f"error: {e.format_message()}{ctx}", highlight=False, markup=False)
        code = 2
    except SfumatoError as e:
        if verbose:
            console.print_exception()
        console.print(f"error: {e}", highlight=False, markup=False)
        code = e.exit_code
    except ABORTS:
        console.print("interrupted")
        code = 130
    except Exception as e:  # a bug, not a user mistake: still one line unless -v
        if verbose:
            console.print_exception()
        console.print(f"error: {type(e).__name__}: {e} (run with -v for the traceback)", highlight=False, markup=False)
        code = 1
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
