"""Progress bars on the terminal: one set-up for every bar sfumato draws (rich is imported only
when a bar is shown).

    bar, task = start_progress(len(items), "embedding images", stderr=True)
    ...
    bar.advance(task)
    bar.stop()
"""

from __future__ import annotations

# Column sets: "plain" is rich's default (description, bar, percentage, time left); "count" shows
# done/total and the time taken; "loss" is the training bar (stage name, done/total, loss, rate).
COLUMNS = ("plain", "count", "loss")


def start_progress(total: int, description: str, columns: str = "plain", stderr: bool = False,
                   transient: bool = True, completed: int = 0, **fields):
    """A started rich Progress with one task; returns (progress, task id). Call progress.stop() when done.

    Args:
        total: steps of the task; completed: steps already done.
        description: the task's label.
        columns: one of COLUMNS.
        stderr: draw on stderr (the CLI keeps stdout for results).
        transient: remove the bar when it stops.
        fields: extra task fields the columns show ("loss": loss and rate).
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if columns == "plain":
        cols = Progress.get_default_columns()
    elif columns == "count":
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    elif columns == "loss":
        cols = (TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
                TimeRemainingColumn())
    else:
        raise ValueError(f"unknown progress columns {columns!r}; choose from {', '.join(COLUMNS)}")
    p = Progress(*cols, console=Console(stderr=True) if stderr else None, transient=transient)
    task = p.add_task(description, total=total, completed=completed, **fields)
    p.start()
    return p, task
