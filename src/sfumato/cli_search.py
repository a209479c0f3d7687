"""CLI verbs of the embedding space: index, search, classify."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the index / search / classify verbs to the main app."""
