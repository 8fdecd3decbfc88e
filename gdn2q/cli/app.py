"""The ``gdn2q`` typer application and the guard that turns bad input into one line and exit status 2."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from gdn2q.errors import GDN2QError

app = typer.Typer(
    name="gdn2q",
    help="Quantize, run, export and compare Gated DeltaNet-2 language models.\n\n"
         "With no MODEL argument every command uses the small GDN-2 model bundled in the package.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; a :class:`GDN2QError` prints ``error: <message>`` and exits 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GDN2QError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def main() -> None:
    app()
