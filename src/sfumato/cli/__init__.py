"""The `sfumato` command: one verb per job; each verb parses its options and calls the library.

    sfumato data shapes --n 1000 --out data/shapes
    sfumato train --data data/shapes --out models/mine --preset tiny
    sfumato generate "a red circle" --out first.png

Each verb module owns its `typer.Typer()`; this module only assembles them and turns errors into
one line and an exit code.
"""

from __future__ import annotations

import sys

import click
import typer

from .. import __version__
from ..errors import SfumatoError
from . import data, distill, evaluate, explain, export, generate, prior, search, serve, train, tune
from .console import console, out

app = typer.Typer(help="Learn, generate, search and explain images from paired data.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data.app, name="data")
app.add_typer(train.app)
app.add_typer(distill.app)
app.add_typer(tune.app)
app.add_typer(prior.app)
app.add_typer(export.app)
app.add_typer(generate.app)
app.add_typer(search.app)
app.add_typer(explain.app, name="explain")
app.add_typer(evaluate.app, name="eval")
app.add_typer(serve.app)

# typer raises its own copy of click's exceptions: reach its UsageError through the public BadParameter.
USAGE_ERRORS = (click.exceptions.UsageError, typer.BadParameter.__base__)
ABORTS = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)


def _version(value: bool) -> None:
    if value:
        out.print(f"sfumato {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass  # -v is read by main() from argv before typer parses anything; declared here for --help


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line (exit 2 usage, 1 failure), -v shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        rv = app(args=argv, prog_name="sfumato", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except USAGE_ERRORS as e:
        ctx = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
        console.print(f"error: {e.format_message()}{ctx}", highlight=False, markup=False)
        code = 2
    except SfumatoError as e:
        if verbose:
            console.print_exception()
        console.print(f"error: {e}", highlight=False, markup=False)
        code = e.exit_code
    except ABORTS:
        console.print("interrupted")
        code = 130
    except Exception as e:  # a bug, not a user mistake: still one line unless -v
        if verbose:
            console.print_exception()
        console.print(f"error: {type(e).__name__}: {e} (run with -v for the traceback)", highlight=False, markup=False)
        code = 1
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
