"""`sfumato generate` and `sfumato info`: prompts in, PNGs out; the parameters a PNG carries.

    sfumato generate "a red circle to the left of a blue square" -n 4 --grid --out outputs/
    sfumato info outputs/00000-0-a-red-circle.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_STRENGTH
from ..config import GenerationSettings as S
from ..errors import UsageError
from .console import console, out

app = typer.Typer()


def _list_schedulers(value: bool) -> None:
    if value:
        from ..pipeline import SCHEDULERS

        for name, (cls, kw) in SCHEDULERS.items():
            extra = ", ".join(f"{k}={v}" for k, v in kw.items())
            mark = " (default)" if name == S.scheduler else ""
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
    prompt: Optional[str] = typer.Argument(None, help="What to draw, in AUTOMATIC1111's syntax: (word:1.3), (word) "
                                           "x1.1, \\[word] /1.1, \\( for a bracket, BREAK; any length."),
    model: Optional[Path] = typer.Option(None, "--model", help="Diffusers Stable Diffusion folder (default: shipped model)."),
    seed: int = typer.Option(S.seed, "--seed", help="Seed of the first image; image i uses seed + i."),
    num_images: int = typer.Option(1, "-n", "--num-images", help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Sampler steps (default: the model's, else {S.steps})."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale, 1 disables "
                                             f"(default: the model's, else {S.guidance:g})."),
    negative: str = typer.Option(S.negative, "--negative", help="Negative prompt (same syntax)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Sampler name (see --list-schedulers; "
                                            f"default: the model's, else {S.scheduler})."),
    size: str = typer.Option("", "--size", help="N or WxH pixels (default: the model's native size)."),
    layout_search: int = typer.Option(S.layout_search, "--layout-search", help="For a prompt naming a spatial "
                                      "relation ('A left of B'): candidate noises tried, the one whose layout "
                                      "follows the relation is drawn (8 is a good value); 0: off."),
    mean_prior: Optional[float] = typer.Option(None, "--mean-prior", help="Gain of the model's mean prior, which "
                                               "moves the few-step sampler's first estimate to where the training "
                                               "pairs put things for such a caption (default: the model's own; "
                                               "0: off)."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Start from this image (img2img)."),
    strength: float = typer.Option(DEFAULT_STRENGTH, "--strength", help="img2img: how much of the schedule to re-run (0-1)."),
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

    from .. import generate as gen
    from ..pairs import open_image
    from ..pipeline import load

    if prompts is None and not prompt:
        raise UsageError("give a PROMPT or --prompts FILE")
    if prompts is not None and prompt:
        raise UsageError("give either a PROMPT or --prompts FILE, not both")
    texts = gen.read_prompts(prompts) if prompts else [prompt]
    w, h = _parse_size(size) if size else (0, 0)
    if mask is not None and init_image is None:
        raise UsageError("--mask needs --init-image")
    init = open_image(init_image) if init_image is not None else None
    mask_img = open_image(mask) if mask is not None else None
    if neighbours < 0:
        raise UsageError(f"--neighbours must be 0 or more, got {neighbours}")
    if (neighbours > 0) != (index is not None):
        raise UsageError("--neighbours K and --index INDEX go together")
    pipe = load(model)
    settings = pipe.settings("", negative=negative, seed=seed, steps=steps, guidance=guidance, scheduler=scheduler,
                             width=w, height=h, strength=strength if init_image is not None else None,
                             layout_search=layout_search, mean_prior=mean_prior)
    after = _after_image(pipe, audit, neighbours, index) if (audit or neighbours) else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = gen.run(pipe, texts, settings, out_path, num_images, grid, batch=prompts is not None,
                        explain=explain, after=after, init_image=init, mask=mask_img)
    for w in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
        console.print(f"warning: {w}", highlight=False, markup=False)
    for p in paths:
        out.print(str(p), highlight=False)


def _after_image(pipe, audit: bool, k: int, index):
    """Per-image reports for generate: an adherence audit and/or the nearest indexed images."""
    from ..explain import audit as audit_image
    from ..explain import neighbours
    from .explain import _embedder_or_none, print_audit

    emb = _embedder_or_none(pipe.folder)
    if k and emb is None:
        raise UsageError(f"--neighbours needs a model with a CLIP (clip/), and {pipe.folder} has none")
    if k:
        from ..index import open_index
        from ..search import check_model

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
    from ..images import read_parameters

    out.print(read_parameters(image), highlight=False, markup=False)
