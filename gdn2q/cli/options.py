"""Argument and option types shared by the commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[Path | None, typer.Argument(
    help="Checkpoint: an fla-layout folder, a lit_gpt .pth file or a gdn2q quantized folder. "
         "Default: the small model bundled with gdn2q.", show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="GDN2Config JSON for what tensor shapes cannot tell (lit_gpt attention heads, gate).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it already exists.")]
