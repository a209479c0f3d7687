"""Embed images and texts with the CLIP of a model folder.

    emb = Embedder.load("models/mine")          # MODEL/clip: CLIPModel + CLIPTokenizer
    emb.embed_images([img]), emb.embed_texts(["a red circle"])   # (N, D) unit float32

Images go through the CLIPImageProcessor saved beside the model (clip/preprocessor_config.json); a
folder without one gets what training did: centre crop to the vision tower's size, scaled to [-1, 1].
A model's fingerprint is the sha256 of clip/model.safetensors; an index records it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import SfumatoError, UsageError
from .files import file_sha256


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The model folder to use: `model`, or the shipped default; it must hold clip/."""
    from .pipeline import DEFAULT_MODEL

    folder = Path(model) if model is not None else DEFAULT_MODEL
    if model is None and not folder.exists():
        raise UsageError(f"no --model given and the default model is not installed ({folder}); "
                         "train one with `sfumato train` and pass --model DIR")
    if not folder.exists():
        raise UsageError(f"{folder}: no such model folder")
    if not (folder / "clip" / "model.safetensors").is_file():
        raise UsageError(f"{folder}: no CLIP model in it (expected {folder / 'clip' / 'model.safetensors'})")
    return folder


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of clip/model.safetensors."""
    return file_sha256(Path(folder) / "clip" / "model.safetensors")


class Embedder:
    """A model folder's CLIP towers and tokenizer, on the CPU (or `device`), in eval mode."""

    def __init__(self, folder: Path, clip, tokenizer, fingerprint: str, processor=None):
        self.folder, self.clip, self.tokenizer, self.fingerprint = folder, clip, tokenizer, fingerprint
        self.processor = processor  # transformers CLIPImageProcessor, or None: fit_image as in training
        self.res = int(clip.config.vision_config.image_size)
        self.dim = int(clip.config.projection_dim)

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str = "cpu") -> "Embedder":
        from transformers import CLIPModel, CLIPTokenizer

        from .models import quiet_libraries

        folder = resolve_model(model)
        quiet_libraries()
        try:
            clip = CLIPModel.from_pretrained(folder / "clip").to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(folder / "clip")
            processor = None
            if (folder / "clip" / "preprocessor_config.json").is_file():
                from transformers import CLIPImageProcessor

                processor = CLIPImageProcessor.from_pretrained(folder / "clip")
        except (OSError, ValueError) as e:
            raise SfumatoError(f"{folder}: cannot load its CLIP model ({e})") from None
        return cls(folder, clip, tokenizer, model_fingerprint(folder), processor)

    @property
    def info(self) -> dict:
        """What an index records about the model that made its vectors."""
        return {"path": str(self.folder.resolve()), "fingerprint": self.fingerprint, "dim": self.dim,
                "image_size": self.res}

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp().clamp(max=100))

    def pixel_values(self, images):
        """PIL images -> (N, 3, res, res) float, the vision tower's input."""
        if self.processor is not None:
            return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        from .data import fit_image, to_model_range, to_uint8_tensor

        return to_model_range(to_uint8_tensor([fit_image(im, self.res, "center-crop") for im in images]))

    def embed_images(self, images, batch_size: int = 64) -> np.ndarray:
        """PIL images -> (N, D) unit float32."""
        from .clip import embed_images

        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = self.pixel_values(images).to(self.clip.device)
        return embed_images(self.clip, x, batch_size).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit float32 (cut to the tokenizer's context length)."""
        from .clip import embed_texts
        from .tokenizer import encode

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids, _ = encode(self.tokenizer, list(texts))
        return embed_texts(self.clip, ids.to(self.clip.device)).cpu().numpy()
