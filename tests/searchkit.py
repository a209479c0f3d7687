"""Helpers for the index and search tests: a tiny random CLIP model folder and small image sets."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(folder: Path, seed: int = 0, embed_dim: int = 32) -> Path:
    """A random CLIPModel + trained BPE tokenizer saved as folder/clip (what Embedder loads)."""
    import torch

    from sfumato.config import get_preset
    from sfumato.models import build_clip
    from sfumato.shapesworld import ShapesWorld
    from sfumato.tokenizer import train_tokenizer

    captions = [ShapesWorld(300, seed=0).scene(i).caption for i in range(300)]
    tok = train_tokenizer(captions, 400, 16, folder / "tokenizer")
    cfg = get_preset("tiny")
    cfg.tokenizer.context_length = 16
    cfg.clip.embed_dim = embed_dim
    torch.manual_seed(seed)
    clip = build_clip(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    clip.save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return folder


def make_images(folder: Path, n: int = 12, seed: int = 0, res: int = 32) -> Path:
    """n ShapesWorld images with .txt captions in `folder` (plus manifest.jsonl moved aside)."""
    from sfumato.shapesworld import write_dataset

    write_dataset(folder, n, seed=seed, res=res)
    (folder / "manifest.jsonl").rename(folder.parent / f"{folder.name}-manifest.jsonl")
    for j in folder.glob("*.json"):
        j.unlink()
    return folder
