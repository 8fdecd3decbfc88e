"""`gdn2q bench`: end-to-end decode and prefill throughput on the kernel path (Triton on CUDA)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.options import JsonOpt
from gdn2q.errors import UnsupportedError
from gdn2q.quant.state import STATE_DTYPES, StateQuantConfig

RECIPES = ("bf16", "fp8")
BASELINE = ("bf16", "fp32")  # (weights, state): what serving engines run today
BenchModelArg = Annotated[Path | None, typer.Argument(
    help="Checkpoint to time: an fla-layout folder, a lit_gpt .pth file or a gdn2q quantized folder. "
         "Default: a randomly initialised 1.3B-shaped GDN-2.", show_default=False)]


@app.command()
@guarded
def bench(
    model: BenchModelArg = None,
    batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together (state pool slots).")] = 64,
    state: Annotated[str, typer.Option(help=f"Recurrent-state dtype: {', '.join(STATE_DTYPES)}.")] = "int8",
    state_rounding: Annotated[str, typer.Option(help="nearest, stochastic or error-feedback.")] = "nearest",
    recipe: Annotated[str, typer.Option(help="Weights: bf16, or fp8 (per-row fp8 projections, Hopper).")] = "bf16",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prefill tokens per sequence.")] = 2048,
    layers: Annotated[int | None, typer.Option(min=1, help="Use only this many layers of the 1.3B shape.")] = None,
    baseline: Annotated[bool, typer.Option(help="Also run bf16 weights + fp32 state in the same process and "
                                                "report the speedup.")] = False,
    pdl: Annotated[str | None, typer.Option(help="Programmatic dependent launch in the decode step (Hopper): on, "
                                                 "off, or both (time the step each way and report the "
                                                 "faster). Default: on where supported; GDN2Q_PDL=0 turns "
                                                 "it off.")] = None,
    save: Annotated[Path | None, typer.Option(help="Also write the result as JSON to this file.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure decode tokens/s (one CUDA graph per decode step) and prefill tokens/s.

    With no MODEL a randomly initialised 1.3B-shaped GDN-2 (18 layers, d 2304, H 16 x 128) is used: random
    weights are fine for speed. The Triton kernels run on CUDA; elsewhere the PyTorch reference runs, and the
    output says which ("backend"), and which kernel runs the recurrence ("recurrence": "triton", or
    "gluon-staged" for int8/fp8 states at large batches).

    Example: `gdn2q bench --batch 64 --state int8 --recipe fp8 --baseline`
    """
    import torch

    from gdn2q.kernels.bench import CONFIG_1B3, PDL_MODES, bench_model

    if recipe not in RECIPES:
        raise UnsupportedError(f"unknown --recipe {recipe!r} for bench; choose one of {', '.join(RECIPES)}")
    if pdl is not None and pdl not in PDL_MODES:
        raise UnsupportedError(f"unknown --pdl {pdl!r}; choose one of {', '.join(PDL_MODES)}")
    fmt = StateQuantConfig(state, rounding=state_rounding)
    if model is not None:
        from gdn2q import load_model

        target = load_model(model)
        if target.config.attn is not None:
            raise UnsupportedError(f"{model}: the kernel decode path covers pure GDN-2 models; this one has "
                                   "attention layers")
    else:
        target = CONFIG_1B3.replace(num_hidden_layers=layers) if layers else CONFIG_1B3
    if recipe == "fp8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise UnsupportedError("--recipe fp8 needs a CUDA GPU with fp8 matmuls (SM >= 8.9, e.g. H100); "
                               "here run --recipe bf16")
    with console.status("benchmarking (compiling kernels on first use)"):
        rows = [bench_model(target, batch=batch, state=fmt, recipe=recipe, prompt_len=prompt_len, pdl_mode=pdl)]
        if baseline:
            rows.append(bench_model(target, batch=batch, state=StateQuantConfig(BASELINE[1]),
                                    recipe=BASELINE[0], prompt_len=prompt_len, pdl_mode=pdl))
    result = {"runs": rows, "torch": torch.__version__, "python": platform.python_version()}
    if baseline:
        result["decode_speedup"] = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
        result["prefill_speedup"] = rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"]
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=2) + "\n")
    if json_out:
        print_json(result)
        return
    table = Table(title=f"gdn2q bench on {rows[0]['card']} (backend: {rows[0]['backend']}, "
                        f"CUDA graph: {rows[0]['cuda_graph']})")
    for col in ("weights", "state", "recurrence", "batch", "layers", "decode tok/s", "step ms", "PDL",
                "prefill tok/s"):
        table.add_column(col, justify="left" if col in ("weights", "state", "recurrence") else "right")
    for r in rows:
        table.add_row(r["recipe"], StateQuantConfig(**r["state"]).label, r["decode_kernel"], str(r["batch"]),
                      str(r["layers"]),
                      f"{r['decode_tok_s']:,.0f}", f"{r['decode_step_ms']:.3f}", "on" if r["pdl"] else "off",
                      f"{r['prefill_tok_s']:,.0f}")
    console.print(table)
    for r in rows:
        if "decode_step_ms_pdl_off" in r:
            console.print(f"{r['recipe']} weights: decode step {r['decode_step_ms_pdl_off']:.3f} ms without PDL, "
                          f"{r['decode_step_ms_pdl_on']:.3f} ms with it")
    if baseline:
        console.print(f"decode speedup vs bf16 weights + fp32 state: {result['decode_speedup']:.2f}x; "
                      f"prefill {result['prefill_speedup']:.2f}x")
