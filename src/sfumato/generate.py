"""`sfumato generate`: prompts in, PNGs out (with AUTOMATIC1111 `parameters` chunks), never half-written.

    sfumato generate "a red circle to the left of a blue square" -n 4 --grid --out outputs/
    sfumato generate --prompts prompts.txt --out batch/      # batch/index.jsonl lists every image
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .config import DEFAULT_STRENGTH, GenerationSettings
from .errors import UsageError
from .files import atomic_write_text
from .images import save_png
from .progress import start_progress

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


def run(pipe, prompts: list[str], settings: GenerationSettings, out: Path, n: int, grid: bool, batch: bool,
        progress: bool = True, explain: bool = False, after=None, init_image=None, mask=None) -> list[Path]:
    """Generate n images per prompt with `settings` (its prompt replaced by each of `prompts`, prompt j
    seeded settings.seed + j * n); write them, index.jsonl for batches, and an optional grid.

    explain: also write IMAGE.words.png (per-word attention overlays) and IMAGE.maps.npz.
    after(image, prompt, path) -> [paths]: called once per written image (audits, neighbours)."""
    from .viz import make_grid

    plan = Plan.make(out, n * len(prompts), batch)
    runs = [replace(settings, prompt=p, seed=settings.seed + j * n) for j, p in enumerate(prompts)]
    for s in runs:  # check every prompt and setting before the first image is drawn
        pipe.check(replace(s, strength=s.strength if init_image is not None else None), n)
    plan.folder.mkdir(parents=True, exist_ok=True)
    written, rows, images = [], [], []
    bar = start_progress(len(prompts) * n, "generating", "count") if progress else None
    try:
        for j, s in enumerate(runs):
            result = pipe.generate(s, n=n, init_image=init_image, mask=mask, capture=explain)
            batch_images, maps = result if explain else (result, None)
            for i, img in enumerate(batch_images):
                k = j * n + i
                path = plan.path(s.prompt, settings.seed + k, k)
                save_png(img, path)
                written.append(path)
                if explain:
                    from .explain import word_maps_from_tokens

                    wm = word_maps_from_tokens(pipe.tokenizer, s.prompt, img, maps[i])
                    extra = [path.with_suffix(".words.png"), path.with_suffix(".maps.npz")]
                    wm.save(*extra)
                    written += extra
                if after is not None:
                    written += after(img, s.prompt, path) or []
                images.append(img)
                rows.append({"file": path.name, "prompt": s.prompt, "seed": settings.seed + k,
                             "parameters": img.info["parameters"], **_row_settings(settings, init_image is not None)})
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


def _row_settings(s: GenerationSettings, img2img: bool) -> dict:
    row = {"steps": s.steps, "guidance": s.guidance, "negative": s.negative, "scheduler": s.scheduler,
           "size": [s.width, s.height] if s.width or s.height else 0}
    if img2img:
        row["strength"] = DEFAULT_STRENGTH if s.strength is None else s.strength
    return row
