"""`sfumato generate`: prompts in, PNGs out (with AUTOMATIC1111 `parameters` chunks), never half-written.

    sfumato generate "a red circle to the left of a blue square" -n 4 --grid --out outputs/
    sfumato generate --prompts prompts.txt --out batch/      # batch/index.jsonl lists every image
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import atomic_write_text
from .images import save_png

MAX_PROMPTS = 10_000


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts from {path}: {e}") from None
    prompts = [l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one a line; lines starting with # are skipped)")
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"{path} holds {len(prompts)} prompts; the limit is {MAX_PROMPTS}")
    return prompts


@dataclass
class Plan:
    """Where each image of a run goes, decided (and checked) before anything is generated."""

    folder: Path
    single_file: Path | None = None  # --out FILE.png with one image
    stem: str | None = None  # --out FILE.png with several: FILE-0.png, FILE-1.png, ...

    @classmethod
    def make(cls, out: Path, n_total: int, batch: bool) -> "Plan":
        if out.suffix.lower() == ".png":
            if batch:
                raise UsageError("--prompts writes a folder: give --out a folder, not a .png file")
            if out.is_dir():
                raise UsageError(f"{out} is a folder; drop the .png suffix or pick another name")
            return cls(out.parent, out) if n_total == 1 else cls(out.parent, stem=out.stem)
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder")
        return cls(out)

    def path(self, prompt: str, seed: int, k: int) -> Path:
        if self.single_file is not None:
            return self.single_file
        return self.folder / (f"{self.stem}-{k}.png" if self.stem else f"{k:05d}-{seed}-{slug(prompt)}.png")

    def grid_path(self) -> Path:
        name = (self.single_file.stem if self.single_file else self.stem) if (self.single_file or self.stem) else ""
        return self.folder / (f"{name}-grid.png" if name else "grid.png")


def run(pipe, prompts: list[str], out: Path, n: int, seed: int, grid: bool, batch: bool, progress: bool = True,
        explain: bool = False, after=None, **kw) -> list[Path]:
    """Generate n images per prompt; write them, index.jsonl for batches, and an optional grid.

    explain: also write IMAGE.words.png (per-word attention overlays) and IMAGE.maps.npz.
    after(image, prompt, path) -> [paths]: called once per written image (audits, neighbours)."""
    from contextlib import nullcontext

    from .viz import make_grid

    plan = Plan.make(out, n * len(prompts), batch)
    for p in prompts:  # check every prompt and setting before the first image is drawn
        pipe.check(_settings(p, seed, kw), n)
    plan.folder.mkdir(parents=True, exist_ok=True)
    written, rows, images = [], [], []
    bar = _bar(len(prompts) * n) if progress else None
    try:
        for j, prompt in enumerate(prompts):
            if explain:
                from .explain import generation_capture, word_maps_from_tokens
            capture = generation_capture(pipe, kw.get("size", 0), kw.get("guidance", 4.0)) if explain else nullcontext()
            with capture as store:
                batch_images = pipe.generate(prompt, n=n, seed=seed + j * n, **kw)
            if explain and store.calls == 0:
                raise UsageError("--explain has nothing to show: at this --strength the model never runs "
                                 "(the init image comes back unchanged); raise --strength or drop --explain")
            for i, img in enumerate(batch_images):
                k = j * n + i
                path = plan.path(prompt, seed + k, k)
                save_png(img, path)
                written.append(path)
                if explain:
                    wm = word_maps_from_tokens(pipe.tokenizer, prompt, img, store.maps()[i])
                    extra = [path.with_suffix(".words.png"), path.with_suffix(".maps.npz")]
                    wm.save(*extra)
                    written += extra
                if after is not None:
                    written += after(img, prompt, path) or []
                images.append(img)
                rows.append({"file": path.name, "prompt": prompt, "seed": seed + k,
                             "parameters": img.info["parameters"], **_row_settings(kw)})
                if bar:
                    bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
    if batch:
        atomic_write_text(plan.folder / "index.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if grid:
        sheet = make_grid(images, [r["prompt"] for r in rows], cols=min(len(images), max(n, 4)))
        save_png(sheet, plan.grid_path())
        written.append(plan.grid_path())
    return written


def _settings(prompt, seed, kw):
    from .pipeline import GenerationSettings

    size = kw.get("size", 0)
    w, h = (size, size) if isinstance(size, int) else size
    return GenerationSettings(prompt, kw.get("negative", ""), seed, kw.get("steps", 20), kw.get("guidance", 4.0),
                              kw.get("scheduler", "DPM++ 2M"), w, h)


def _row_settings(kw) -> dict:
    keep = ("steps", "guidance", "negative", "scheduler", "size", "strength")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k in keep}


def _bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = p.add_task("gen", total=total)
    p.start()
    return p, task
