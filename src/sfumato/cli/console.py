"""The CLI's two consoles: `out` for results (stdout) and `console` for messages and progress (stderr)."""

from __future__ import annotations

from rich.console import Console

# soft_wrap: a one-line error stays one line when stderr is a pipe or a narrow terminal.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
