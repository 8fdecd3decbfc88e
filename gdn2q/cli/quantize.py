"""`gdn2q quantize`: weights to int8/fp8/int4/nf4 under a GDN-2 precision policy, saved as a folder."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import torch
import typer

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.generate import parse_dtype
from gdn2q.cli.options import ConfigOpt, ForceOpt, JsonOpt, ModelArg
from gdn2q.cli.state_options import (
    ConvStateOpt,
    StateGranularityOpt,
    StateOpt,
    StateResidualOpt,
    StateRoundingOpt,
    StateScalesOpt,
    state_format,
)
from gdn2q.errors import OutputExistsError, UnsupportedError
from gdn2q.quant.recipes import RECIPES

RECIPE_HELP = "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items())


def source_dtype(info: dict) -> torch.dtype:
    """The precision a checkpoint is stored in (what 'source precision' means for kept weights)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(info.get("dtype", ""), torch.float32)


@app.command()
@guarded
def quantize(
    model: ModelArg = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help=f"Recipe. {RECIPE_HELP}.")] = "int8-wo",
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized folder to write.")] = Path("quantized"),
    calib: Annotated[Path | None, typer.Option(
        "--calib", help="Calibration file from gdn2q calibrate (needed by w8a8-int8 SmoothQuant).")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Regex of Linear names to keep in the source precision (repeatable), e.g. 'layers\\.0\\.'.")
    ] = None,
    gates: Annotated[str, typer.Option(
        help="GDN-2 gate projections b_proj, w_proj, f_proj, g_proj: keep (source precision) or quantize.")
    ] = "keep",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="SmoothQuant migration strength.")] = 0.5,
    smoothquant: Annotated[bool, typer.Option(help="Use SmoothQuant scales (recipes that support it).")] = True,
    sq_stat: Annotated[str, typer.Option(
        "--sq-stat", help="Activation range SmoothQuant uses: absmax, or percentile / mse if calibrated with "
                          "--clip percentile / --clip mse.")] = "absmax",
    dtype: Annotated[str | None, typer.Option(
        help="Activation/kept-weight dtype: fp32, bf16 or fp16. Default: the checkpoint's own.")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    state: StateOpt = "fp32",
    state_rounding: StateRoundingOpt = "nearest",
    state_granularity: StateGranularityOpt = "row",
    state_scales: StateScalesOpt = "dynamic",
    conv_state: ConvStateOpt = "fp32",
    state_residual: StateResidualOpt = "full",
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Quantize a GDN-2 model's weights and write a self-describing folder (config.json with a quantization
    section + model.safetensors + tokenizer.json) that gdn2q.load_model reloads to identical logits.

    Always kept in the source precision: A_log, dt_bias, short convs, norms, embeddings, lm_head.

    Example: `gdn2q quantize ../shared/checkpoints/small --recipe w8a8-int8 --calib calib.safetensors -o small-w8a8`
    """
    from gdn2q.calib import load_calibration
    from gdn2q.checkpoint import build_model, read_checkpoint
    from gdn2q.quant import quantize_model
    from gdn2q.quant.folder import save_quantized_folder, summarize_quantized
    from gdn2q.quant.recipes import check_runnable, get_recipe

    r = get_recipe(recipe)
    check_runnable(r, torch.device(device))
    fmt = state_format(state, state_rounding, state_granularity, state_scales, conv_state, state_residual)
    if output.exists() and not force:
        raise OutputExistsError(output)
    ckpt = read_checkpoint(model, config)
    if ckpt.is_quantized:
        raise UnsupportedError(f"{ckpt.path}: already quantized; quantize its source model instead")
    cal = load_calibration(calib) if calib else None
    with contextlib.nullcontext() if json_out else console.status(f"quantizing with {r.name}"):
        lm = build_model(ckpt, parse_dtype(dtype) if dtype else source_dtype(ckpt.info), device)
        del ckpt
        quantize_model(lm, r, calib=cal, keep=tuple(keep or ()), gates=gates,
                       smoothquant_alpha=alpha if smoothquant else None, smoothquant_stat=sq_stat,
                       state_format=fmt)
        save_quantized_folder(lm, output, force=force)
    info = summarize_quantized(output)
    if json_out:
        print_json(info)
        return
    from gdn2q.cli.inspect_model import render

    render(info)
    q = info["quantization"]
    console.print(f"wrote {output}: {r.name}, {len(q['policy']['quantized'])} Linears quantized, "
                  f"{len(q['policy']['kept'])} kept; weights {info['bytes']:,} -> {info['bytes_after']:,} bytes"
                  + (f"; SmoothQuant alpha {q['smoothquant']['alpha']}" if q["smoothquant"] else ""))

