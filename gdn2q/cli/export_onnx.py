"""`gdn2q export-onnx`: the decode step as an ONNX graph for onnxruntime; `generate --onnx` runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gdn2q.cli.app import app, console, err_console, guarded, print_json
from gdn2q.cli.options import ConfigOpt, ForceOpt, JsonOpt, ModelArg
from gdn2q.errors import DataError
from gdn2q.export.spec import PREFILL_MODES, STATE_FORMATS, WEIGHT_FORMATS

EXIT_VERIFY_FAILED = 1
RANDOM_PROMPT_TOKENS = 8


@app.command("export-onnx")
@guarded
def export_onnx_cmd(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (model.onnx, tokenizer.json, "
                                         "gdn2q_onnx.json).")] = ...,
    weights: Annotated[str, typer.Option(help=f"Weight format: {', '.join(WEIGHT_FORMATS)} (int8/int4: "
                                         "onnxruntime MatMulNBits).")] = "fp32",
    state: Annotated[str | None, typer.Option(help=f"Recurrent-state format: {', '.join(STATE_FORMATS)} "
                                              "(default: the model's own state format).")] = None,
    prefill: Annotated[str, typer.Option(help="graph: input_ids [B, T] with T dynamic (prompt in one call, an ONNX "
                                         "Scan inside); step: T = 1 and no control-flow op (for runtimes without "
                                         "Scan), prompts fed token by token.")] = "graph",
    block_size: Annotated[int | None, typer.Option(help="Quantization block along the input axis "
                                                   "(default 128 for int8, 32 for int4).")] = None,
    quantize_lm_head: Annotated[bool, typer.Option(help="Quantize lm_head too (int8/int4).")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Compare onnxruntime with PyTorch after export; "
                                         "exit 1 if they disagree.")] = False,
    verify_steps: Annotated[int, typer.Option(min=1, help="Greedy decode steps compared by --verify.")] = 64,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt used by --verify.")] = "ROMEO:",
    atol: Annotated[float | None, typer.Option(help="--verify limit on max |logit diff| for fp32 exports "
                                               "(default 1e-4).")] = None,
    min_top1: Annotated[float | None, typer.Option(help="--verify limit on top-1 agreement for fp16/quantized "
                                                   "exports (default fp16 0.99, int8 0.95, int4 0.85).")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a GDN-2 model to ONNX: input_ids + past state in, logits + present state out.

    Layer states are named as onnxruntime-genai names them (past_key_values.{i}.recurrent_state ->
    present.{i}.recurrent_state, .conv_state, and .key/.value for sliding-window attention layers); the batch
    axis is dynamic, and one graph serves the prompt (T tokens) and each decode step (T = 1). Run the folder with
    `gdn2q generate --onnx DIR` or gdn2q.export.runner.OnnxGDN2Runner (numpy + onnxruntime only).

    Example: `gdn2q export-onnx -o tiny-int8 --weights int8 --state int8 --verify`
    """
    from gdn2q import load_model
    from gdn2q.export.exporter import export_onnx

    if state is not None and state not in STATE_FORMATS:
        raise DataError(f"--state {state}: choose one of {', '.join(STATE_FORMATS)}")
    if weights not in WEIGHT_FORMATS:
        raise DataError(f"--weights {weights}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if prefill not in PREFILL_MODES:
        raise DataError(f"--prefill {prefill}: choose one of {', '.join(PREFILL_MODES)}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True, disable=json_out) as bar:
        task = bar.add_task("loading the model", total=None)
        lm = load_model(model, config=config)
        bar.update(task, description=f"building the graph ({weights} weights) and writing {output}")
        result = export_onnx(lm, output, weights=weights, state=state, prefill=prefill, block_size=block_size,
                             quantize_lm_head=quantize_lm_head, force=force)
        report = None
        if verify:
            bar.update(task, description=f"verifying against PyTorch ({verify_steps} decode steps)")
            report = _verify(lm, output, prompt, verify_steps, atol, min_top1)
    out = result.to_json()
    if report is not None:
        out["verify"] = report.to_json()
    if json_out:
        print_json(out)
    else:
        console.print(f"wrote {output} ({result.onnx_bytes / 1e6:.1f} MB ONNX, weights {result.spec.weights}, "
                      f"state {result.spec.state}, {len(result.spec.state_tensors)} state tensors)")
        if report is not None:
            console.print(report.summary(), highlight=False)
    if report is not None and not report.passed:
        if json_out:
            err_console.print(report.summary(), highlight=False)
        raise typer.Exit(EXIT_VERIFY_FAILED)


def _verify(lm, folder: Path, prompt: str, steps: int, atol: float | None, min_top1: float | None):
    from gdn2q.data import load_tokenizer
    from gdn2q.export.runner import OnnxGDN2Runner
    from gdn2q.export.verify import fp32_reference, verify_export

    if lm.tokenizer_path is not None:
        ids = load_tokenizer(lm.tokenizer_path).encode(prompt).ids
        if not ids:
            raise DataError("--prompt encodes to no tokens; give some text")
    else:  # no tokenizer beside the model: a fixed pseudo-random prompt still exercises every op
        ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, RANDOM_PROMPT_TOKENS).tolist()
    # a bf16 or quantized model is checked against an fp32 copy with its dequantized weights: what the graph computes
    return verify_export(OnnxGDN2Runner(folder), fp32_reference(lm), ids, steps, atol=atol, min_top1=min_top1)


def generate_onnx(folder: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                  seed: int, json_out: bool) -> None:
    """`gdn2q generate --onnx DIR`: the same output as the PyTorch path, computed by onnxruntime."""
    from gdn2q.cli.generate import run_generation
    from gdn2q.export.runner import OnnxGDN2Runner, sample

    runner = OnnxGDN2Runner(folder)
    ids = runner.tokenizer.encode(prompt).ids
    if not ids:
        raise DataError("--prompt encodes to no tokens; give some text")
    rng = np.random.default_rng(seed)
    state = None

    def prefill():
        nonlocal state
        logits, state = runner.prefill(np.array([ids]))
        return logits

    run_generation(prompt, ids, prefill=prefill, pick=lambda logits: sample(logits[0], temperature, top_k, rng),
                   step=lambda nxt: runner.step(np.array([nxt]), state), decode=runner.tokenizer.decode,
                   max_new_tokens=max_new_tokens, json_out=json_out, label="generating (onnxruntime)",
                   how=f"onnxruntime, weights {runner.spec.weights}, state {runner.spec.state}",
                   extra={"onnx": str(folder), "weights": runner.spec.weights, "state": runner.spec.state})
