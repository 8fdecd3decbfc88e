"""The `gdn2q` command line: one module per command, all registered on one typer app."""

from gdn2q.cli import convert, demo, generate, inspect_model  # noqa: F401  (registers the commands)
from gdn2q.cli.app import app, main

__all__ = ["app", "main"]
