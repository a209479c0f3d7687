"""CLI verbs that explain: per-word maps of a generation, grounding on a given image, adherence audit.

    sfumato explain generate "a red circle above a blue square" --out why/
    sfumato explain image photo.png --text "red circle" --text "blue square" --out where/
    sfumato explain audit image.png --prompt "three red squares"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import GenerationSettings as S
from ..errors import UsageError
from .console import out

app = typer.Typer(help="Show where the model put each word, and whether an image shows its prompt.",
                  no_args_is_help=True)


def _embedder_or_none(folder):
    """The model's CLIP for zero-shot checks, or None for a folder without one (plain SD)."""
    from ..embedding import Embedder

    if not (Path(folder) / "clip" / "model.safetensors").is_file():
        return None
    return Embedder.load(folder)


def print_audit(rows, as_json: bool = False, title: str = "") -> None:
    if as_json:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    if title:
        out.print(title, highlight=False, markup=False)
    for r in rows:
        mark = {True: "ok  ", False: "FAIL", None: "?   "}[r.ok]
        out.print(f"  {mark} {r.words!r}: {r.reason}  [{r.source}]", highlight=False, markup=False)


@app.command("generate")
def explain_generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for image.png, words.png and maps.npz."),
    model: Optional[Path] = typer.Option(None, "--model", help="Diffusers Stable Diffusion folder (default: shipped model)."),
    seed: int = typer.Option(S.seed, "--seed", help="Seed."),
    steps: int = typer.Option(S.steps, "--steps", help="Sampler steps."),
    guidance: float = typer.Option(S.guidance, "--guidance", help="Classifier-free guidance scale."),
    scheduler: str = typer.Option(S.scheduler, "--scheduler", help="Sampler name."),
) -> None:
    """Generate one image and a heat map of every word of the prompt (cross-attention, DAAM-style)."""
    from ..files import publish_dir
    from ..images import save_png
    from ..explain import word_maps
    from ..pipeline import load

    pipe = load(model)
    wm = word_maps(pipe, S(prompt, seed=seed, steps=steps, guidance=guidance, scheduler=scheduler))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_png(wm.image, tmp / "image.png")
    wm.save(tmp / "words.png", tmp / "maps.npz")
    publish_dir(tmp, out_dir)
    for name in ("image.png", "words.png", "maps.npz"):
        out.print(str(out_dir / name), highlight=False)


@app.command("image")
def explain_image(
    image: Path = typer.Argument(..., help="An existing image."),
    text: list[str] = typer.Option(..., "--text", help="A phrase to find (repeatable)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for heatmaps.npz and overlay.png."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder with a UNet (default: shipped model)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Also describe the image by its nearest indexed captions."),
    k: int = typer.Option(5, "-k", help="Nearest captions to list with --index."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Where is each phrase in IMAGE? Heat maps from the UNet's cross-attention on the noised image."""
    from ..explain import ground, neighbours, zero_shot
    from ..pairs import open_image
    from ..pipeline import load

    img = open_image(image)
    folder = model
    pipe = load(folder)
    g = ground(pipe, img, list(text))
    emb = _embedder_or_none(pipe.folder)
    if emb is not None:
        g.probabilities = zero_shot(emb, img, list(text))
    if index is not None:
        if emb is None:
            raise UsageError(f"--index needs a model with a CLIP (clip/), and {pipe.folder} has none")
        g.neighbours, _ = neighbours(index, emb, img, k)
    g.save(out_dir)
    result = {"phrases": g.phrases, "peaks": g.peaks(),
              "probabilities": None if g.probabilities is None else [float(p) for p in g.probabilities],
              "closest_captions": [h.caption for h in g.neighbours],
              "heatmaps": str(out_dir / "heatmaps.npz"), "overlay": str(out_dir / "overlay.png")}
    if as_json:
        out.print_json(json.dumps(result))
        return
    for i, phrase in enumerate(g.phrases):
        p = "" if g.probabilities is None else f"  zero-shot p={g.probabilities[i]:.2f}"
        out.print(f"{phrase!r}: peak at {tuple(g.peaks()[i])}{p}", highlight=False, markup=False)
    if g.neighbours:
        caps = "; ".join(f"{h.caption} ({h.score:.2f})" for h in g.neighbours if h.caption)
        out.print(f"closest captions: {caps}", highlight=False, markup=False)
    out.print(result["overlay"], highlight=False)


@app.command("audit")
def explain_audit(
    image: Path = typer.Argument(..., help="An image to judge."),
    prompt: str = typer.Option(..., "--prompt", help="What the image should show."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: shipped model)."),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="Also compare attention peaks (needs a UNet)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
) -> None:
    """Say word by word whether IMAGE shows what PROMPT asked (checker, zero-shot, attention)."""
    from ..explain import audit
    from ..pairs import open_image
    from ..pipeline import load

    img = open_image(image)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    pipe = load(model) if attention else None
    emb = _embedder_or_none(pipe.folder if pipe else (model or _default_model()))
    rows = audit(img, prompt, pipe=pipe, embedder=emb)
    print_audit(rows, as_json, f"{image}: {prompt!r}")


def _default_model():
    from ..pipeline import DEFAULT_MODEL

    return DEFAULT_MODEL

