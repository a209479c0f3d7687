"""CLI verbs of the embedding space: index, search, classify.

    sfumato index build data/shapes --out shapes.index --model models/mine
    sfumato index add shapes.index new/*.png
    sfumato index remove shapes.index old.png
    sfumato search shapes.index --text "a red circle" -k 5 --grid hits.png
    sfumato search shapes.index --image q.png --text "blue"
    sfumato classify img.png --labels "red circle,blue square" --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import SfumatoError, UsageError
from .console import console, out

app = typer.Typer()
index_app = typer.Typer(help="Build and edit an image index (FAISS/exact vectors + SQLite metadata).",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")


def _skipped(report) -> None:
    for p in report.problems:
        console.print(f"skipped {p.path}: {p.reason}", highlight=False, markup=False)


def _report(report, verb: str) -> None:
    _skipped(report)
    if report.duplicates:
        console.print(f"skipped {len(report.duplicates)} image(s) already in the index (same sha256)",
                      highlight=False)
    for p in report.not_found:
        console.print(f"not in the index: {p}", highlight=False, markup=False)
    done = f"added {report.added}" if verb != "remove" else f"removed {report.removed}"
    out.print(f"{done}; {report.index} now holds {report.total} images ({report.kind}, version {report.version})",
              highlight=False, markup=False)


@index_app.command("build")
def build_cmd(
    source: Path = typer.Argument(..., help="A folder of images (.txt captions optional) or a .jsonl/.csv manifest."),
    out_dir: Path = typer.Option(..., "--out", help="Index folder to write."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder with clip/ (default: shipped model)."),
    kind: str = typer.Option("auto", "--kind", help="auto | flat (exact) | hnsw | ivfpq; auto: flat up to "
                             "100k images, then hnsw, ivfpq beyond 2M."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index (atomically)."),
) -> None:
    """Embed every image of SOURCE into a new index."""
    from ..embedding import Embedder
    from ..search import build_index

    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    emb = Embedder.load(model)
    _report(build_index(source, out_dir, emb, kind=kind, overwrite=overwrite, progress=True), "build")


@index_app.command("add")
def add_cmd(
    index: Path = typer.Argument(..., help="Index folder."),
    files: list[Path] = typer.Argument(..., help="Images, folders or manifests to add."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the index's model)."),
) -> None:
    """Append images without a rebuild; images already present (same sha256) are skipped."""
    from ..embedding import Embedder
    from ..search import add_to_index, index_model

    emb = Embedder.load(model or index_model(index))
    report = add_to_index(index, files, emb, progress=True)
    if not report.added and not report.duplicates:  # all already there is fine; nothing usable is not
        problems = report.problems
        if len(problems) == 1:
            raise SfumatoError(f"nothing added to {index}: {problems[0].path}: {problems[0].reason}")
        _skipped(report)
        why = f"none of {len(problems)} files could be read (listed above)" if problems else "no images found"
        raise SfumatoError(f"nothing added to {index}: {why}")
    _report(report, "add")


@index_app.command("remove")
def remove_cmd(
    index: Path = typer.Argument(..., help="Index folder."),
    files: list[Path] = typer.Argument(..., help="Images to remove (by path, or by content if still on disk)."),
) -> None:
    """Remove images from an index."""
    from ..search import remove_from_index

    _report(remove_from_index(index, files), "remove")


@index_app.command("info")
def info_cmd(index: Path = typer.Argument(..., help="Index folder."),
             as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")) -> None:
    """Check an index (every file against its checksum) and describe it."""
    from ..index import disk_size, open_index

    snap = open_index(index)
    m = snap.manifest
    if as_json:
        out.print_json(json.dumps(m))
        return
    out.print(f"{index}: {len(snap)} images, {m['kind']} index of {m['dim']}-d vectors, version {m['version']}, "
              f"{disk_size(index):,} bytes", highlight=False, markup=False)
    out.print(f"model: {m['model']['path']} (fingerprint {m['model']['fingerprint'][:12]})",
              highlight=False, markup=False)


@app.command("search")
def search_cmd(
    index: Path = typer.Argument(..., help="Index folder."),
    text: Optional[str] = typer.Option(None, "--text", help="Words to search by (with --image: what to change)."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image to search by."),
    embedding: Optional[Path] = typer.Option(None, "--embedding", help="A query vector (.npy or .safetensors)."),
    k: int = typer.Option(10, "-k", help="Number of hits."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="--image with --text: how far the words move "
                                          "the image (default: the measured best, 1.0)."),
    method: Optional[str] = typer.Option(None, "--method", help="--image with --text: delta = image + "
                                         "alpha*(text(words) - text(\"\")), sum = image + alpha*text(words) "
                                         "(default: delta)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the index's model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as a JSON list (path, caption, score)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a contact sheet of the hits (.png)."),
) -> None:
    """Find the images nearest to a text, an image, an image changed by words, or an embedding."""
    from ..index import open_index
    from ..search import Query, check_k, search

    check_k(k)
    q = Query(text, image, embedding, alpha, method).validate()
    if grid is not None and grid.suffix.lower() != ".png":
        raise UsageError(f"--grid must name a .png file, got {grid}")
    snap = open_index(index)
    query = q.vector(_embedder(snap, index, model) if q.needs_model else None, snap.dim)
    hits = search(snap, query, k)
    if grid is not None:
        from ..search import hits_grid

        hits_grid(hits, grid)
    if as_json:
        out.print_json(json.dumps([h.to_dict() for h in hits]))
    else:
        for rank, h in enumerate(hits, 1):
            out.print(f"{rank:>3}  {h.score:.4f}  {h.path}  {h.caption or ''}".rstrip(), highlight=False, markup=False,
                      soft_wrap=True)
    if grid is not None:
        console.print(f"grid: {grid}", highlight=False, markup=False)


def _embedder(snap, index, model):
    """The index's model (or --model, checked against the index)."""
    from ..embedding import Embedder
    from ..search import check_model, index_model

    emb = Embedder.load(model or index_model(index))
    check_model(snap.manifest, emb, Path(index))
    return emb


@app.command("classify")
def classify_cmd(
    images: list[Path] = typer.Argument(..., help="Images to classify."),
    labels: Optional[str] = typer.Option(None, "--labels",
                                         help="Comma-separated labels, e.g. \"red circle,blue square\"."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="A file of labels, one a line."),
    template: Optional[list[str]] = typer.Option(
        None, "--template", help="Prompt template with {} (repeatable; default: an ensemble of \"{}\", \"a {}\", "
        "\"an image of a {}\", ...)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder with clip/ (default: shipped model)."),
    top: int = typer.Option(3, "--top", help="Labels to print per image (text output)."),
    as_json: bool = typer.Option(False, "--json", help="Print probabilities per label as JSON."),
) -> None:
    """Zero-shot classification: the probability of each label for each image."""
    from ..embedding import Embedder
    from ..pairs import open_image
    from ..search import TEMPLATES, classify, parse_labels

    names = parse_labels(labels, labels_file)
    templates = tuple(template) if template else TEMPLATES
    pics = [open_image(p) for p in images]
    emb = Embedder.load(model)
    probs = classify(emb, pics, names, templates)
    results = [{"path": str(p), "label": names[int(row.argmax())],
                "probabilities": {n: round(float(v), 6) for n, v in zip(names, row)}}
               for p, row in zip(images, probs)]
    if as_json:
        out.print_json(json.dumps(results))
        return
    for r, row in zip(results, probs):
        best = sorted(zip(names, row), key=lambda t: -t[1])[:max(1, top)]
        out.print(f"{r['path']}: " + ", ".join(f"{n} {v:.3f}" for n, v in best), highlight=False, markup=False,
                  soft_wrap=True)
