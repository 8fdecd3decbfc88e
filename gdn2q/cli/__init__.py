"""The `gdn2q` command line: one module per command, all registered on one typer app."""

from gdn2q.cli import (  # noqa: F401  (registers the commands)
    bench,
    calibrate,
    compare,
    convert,
    demo,
    export_onnx,
    generate,
    inspect_model,
    quantize,
    sensitivity,
)
from gdn2q.cli.app import app, main

__all__ = ["app", "main"]
