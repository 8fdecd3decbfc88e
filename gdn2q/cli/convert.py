"""`gdn2q convert`: any readable checkpoint -> an fla-layout folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gdn2q.checkpoint import read_checkpoint, save_fla_folder
from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.generate import parse_dtype
from gdn2q.cli.options import ConfigOpt, ForceOpt, JsonOpt
from gdn2q.errors import UnsupportedError


@app.command()
@guarded
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint to convert (lit_gpt .pth or fla-layout folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (fla layout).")],
    dtype: Annotated[str | None, typer.Option(help="Cast weights to fp32, bf16 or fp16 (decay stays fp32).")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a checkpoint as an fla-layout folder (config.json + model.safetensors [+ tokenizer.json]).

    lit_gpt checkpoints get output_gate_activation "swish" and norm eps 1e-5 in their config, so the converted
    folder computes exactly what the original does.

    Example: `gdn2q convert final-model-ckpt.pth -o gdn2-fla`
    """
    with console.status(f"reading {src}") as status:
        ckpt = read_checkpoint(src, config)
        if ckpt.is_quantized:
            raise UnsupportedError(f"{src}: already a gdn2q quantized folder; convert the source checkpoint instead")
        status.update(f"writing {output}")
        save_fla_folder(ckpt, output, force=force, dtype=parse_dtype(dtype) if dtype else None)
    result = {"source": str(src), "source_format": ckpt.format, "output": str(output),
              "tensors": len(ckpt.tensors)}
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {output} ({len(ckpt.tensors)} tensors, from {ckpt.format})")
