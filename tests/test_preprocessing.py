"""Image <-> tensor conversions: diffusers' VaeImageProcessor for the VAE's range, the saved
CLIPImageProcessor for the Embedder; the numbers are those of the hand-written conversions they replace."""

import numpy as np
import torch

from sfumato.data import fit_image, from_model_range, to_model_range, to_uint8_tensor
from sfumato.embedding import Embedder
from sfumato.pipeline import DEFAULT_MODEL
from sfumato.shapesworld import ShapesWorld


def test_model_range_round_trip_is_bit_exact():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = to_model_range(u)
    assert torch.equal(x, u.float().div(127.5).sub(1.0))  # what it replaced
    assert torch.equal(from_model_range(x), u)
    y = torch.linspace(-1.3, 1.3, 4001).reshape(1, 1, 1, -1)
    assert torch.equal(from_model_range(y), ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_embedder_uses_the_saved_processor_with_the_same_numbers():
    emb = Embedder.load(DEFAULT_MODEL)
    assert emb.processor is not None  # clip/preprocessor_config.json
    images = [ShapesWorld(4, seed=5, res=64)[i][0] for i in range(4)]
    by_processor = emb.embed_images(images)
    fallback = Embedder(emb.folder, emb.clip, emb.tokenizer, emb.fingerprint)  # a folder without the file
    hand = to_model_range(to_uint8_tensor([fit_image(im, emb.res) for im in images]))
    assert torch.allclose(emb.pixel_values(images), hand, atol=1e-6)
    assert np.allclose(by_processor, fallback.embed_images(images), atol=1e-5)
