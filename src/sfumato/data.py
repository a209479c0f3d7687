"""Training data in memory: images as one uint8 tensor, captions, a held-out split, a fingerprint.

Sources: a folder or manifest of pairs, Hugging Face imagefolders included (see `pairs.py`; a
`pairs.PairSource` names a manifest's columns), or "shapesworld" for pairs generated on the fly
(`DataCfg.shapes_n`, `DataCfg.shapes_seed`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DataCfg
from .errors import UsageError

RESIZE_POLICIES = ("center-crop", "squash", "pad")


def fit_image(img: Image.Image, res: int, policy: str = "center-crop") -> Image.Image:
    """Bring an image to res x res: crop the centre square, squash, or pad with black."""
    img = img.convert("RGB")
    if img.size == (res, res):
        return img
    w, h = img.size
    if policy == "center-crop":
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    elif policy == "pad":
        s = max(w, h)
        canvas = Image.new("RGB", (s, s))
        canvas.paste(img, ((s - w) // 2, (s - h) // 2))
        img = canvas
    elif policy != "squash":
        raise UsageError(f"unknown resize policy {policy!r}; choose from {', '.join(RESIZE_POLICIES)}")
    return img.resize((res, res), Image.BICUBIC, reducing_gap=3.0)


def to_uint8_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], the range the VAE and UNet work in (diffusers'
    VaeImageProcessor.normalize of x / 255; bit for bit x / 127.5 - 1)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.normalize(x.float().div(255.0))


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] (clamped) -> uint8 of the same shape, rounded (diffusers' VaeImageProcessor.denormalize)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.denormalize(x).mul(255.0).round().to(torch.uint8)


def _in_holdout(id_: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(id_.encode(), digest_size=8).digest(), "big")
    return (h % 10_000) < fraction * 10_000


@dataclass
class PairData:
    images: torch.Tensor  # (N, 3, R, R) uint8
    captions: list[str]
    ids: list[str]
    holdout: np.ndarray  # (N,) bool
    fingerprint: str
    source: str
    stats: dict = field(default_factory=dict)
    records: list[dict] | None = None  # scene records (ShapesWorld): where each named object is

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.holdout)

    @property
    def val_idx(self) -> np.ndarray:
        return np.flatnonzero(self.holdout)


def load_pairs_data(source: str, cfg: DataCfg, strict: bool = False, progress: bool = True) -> PairData:
    """Load every pair of `source` at cfg.res; raise UsageError on an empty data set."""
    if source == "shapesworld":
        return _shapesworld(cfg, progress)
    from .pairs import Problem, open_image, read_pairs, require_pairs

    report = read_pairs(source, strict=strict, max_pixels=cfg.max_pixels, verify_images=False, progress=progress)
    images, captions, ids, sizes = [], [], [], set()
    h = hashlib.sha256()
    for p in report.pairs:
        try:
            img = open_image(p.path, max_pixels=cfg.max_pixels)
        except Exception as e:  # reported and skipped like the reader's own problems
            if strict:
                raise
            report.problems.append(Problem(p.path, str(e), "unreadable image"))
            continue
        sizes.add(img.size)
        images.append(fit_image(img, cfg.res, cfg.resize))
        captions.append(p.caption)
        ids.append(p.id)
        st = p.path.stat()
        h.update(f"{p.id}\0{p.caption}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not images:
        report.pairs = []
        require_pairs(report, source)
    holdout = np.array([_in_holdout(i, cfg.holdout) for i in ids])
    stats = {"pairs": len(images), "skipped": len(report.problems), "sizes": len(sizes),
             "resized": sum(s != (cfg.res, cfg.res) for s in sizes)}
    return PairData(to_uint8_tensor(images), captions, ids, holdout, h.hexdigest(), str(Path(source).resolve()), stats)


def _shapesworld(cfg: DataCfg, progress: bool) -> PairData:
    from .shapesworld import ShapesWorld

    from .shapesworld.spec import mix_categories

    ds = ShapesWorld(cfg.shapes_n, seed=cfg.shapes_seed, res=cfg.res, categories=mix_categories(cfg.shapes_mix))
    it = range(len(ds))
    if progress:
        from rich.progress import track

        it = track(it, description=f"rendering {len(ds)} ShapesWorld pairs", transient=True)
    images, captions, records = [], [], []
    for i in it:
        img, cap, rec = ds[i]
        images.append(img)
        captions.append(cap)
        records.append(rec)
    ids = [f"{i:06d}" for i in range(len(ds))]
    holdout = np.array([_in_holdout(i, cfg.holdout) for i in ids])
    mix = f":{cfg.shapes_mix}" if cfg.shapes_mix else ""  # the standard mix keeps its old fingerprint
    fp = hashlib.sha256(f"shapesworld-v1:{cfg.shapes_n}:{cfg.shapes_seed}:{cfg.res}{mix}".encode()).hexdigest()
    return PairData(to_uint8_tensor(images), captions, ids, holdout, fp, "shapesworld",
                    {"pairs": len(ids), "skipped": 0}, records)
