"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def carrying(tmp_path_factory):
    """A tiny model that carries a distilled UNet (`distill --attach`); one per test module."""
    from test_distill import QUICK
    from test_generate import build_tiny_sd

    from sfumato.distill import DistillCfg, distill

    model = build_tiny_sd(tmp_path_factory.mktemp("carrying") / "model")
    distill(model, None, DistillCfg(**QUICK), attach=True, progress=False)
    return model
