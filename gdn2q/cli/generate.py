"""`gdn2q generate`: prefill a prompt and decode token by token from the explicit state."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.options import ConfigOpt, JsonOpt, ModelArg
from gdn2q.data import load_tokenizer
from gdn2q.errors import DataError
from gdn2q.model.lm import sample_next

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DataError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@app.command()
@guarded
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "ROMEO:",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples from softmax(logits / T).")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Sample only among the k likeliest.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weights dtype: fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json (default: the one beside the model).")] = None,
    config: ConfigOpt = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Run a folder written by `gdn2q export-onnx` with "
                                              "onnxruntime instead (no PyTorch model is loaded).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate text with a GDN-2 model: prefill the prompt, then decode one token at a time.

    Example: `gdn2q generate --prompt "KING HENRY:" --max-new-tokens 40`
    (onnxruntime: `gdn2q generate --onnx tiny-onnx --prompt "KING HENRY:"`)
    """
    if onnx is not None:
        from gdn2q.cli.export_onnx import generate_onnx

        if model is not None:
            raise DataError("give either MODEL or --onnx DIR, not both")
        return generate_onnx(onnx, prompt, max_new_tokens, temperature, top_k, seed, json_out)
    from gdn2q import load_model

    lm = load_model(model, dtype=parse_dtype(dtype), device=device, config=config)
    tok = load_tokenizer(tokenizer or lm.tokenizer_path)
    ids = tok.encode(prompt).ids
    if not ids:
        raise DataError("--prompt encodes to no tokens; give some text")
    gen = torch.Generator(device=device).manual_seed(seed)
    state = lm.new_state(1)
    with torch.no_grad():
        run_generation(prompt, ids, prefill=lambda: lm(torch.tensor([ids], device=device), state)[:, -1],
                       pick=lambda logits: int(sample_next(logits, temperature, top_k, gen)),
                       step=lambda nxt: lm(torch.tensor([[nxt]], device=device), state)[:, -1],
                       decode=tok.decode, max_new_tokens=max_new_tokens, json_out=json_out,
                       label="generating", how=f"{device}, {dtype}")


def run_generation(prompt: str, ids: list[int], *, prefill: Callable[[], Any], pick: Callable[[Any], int],
                   step: Callable[[int], Any], decode: Callable[[list[int]], str], max_new_tokens: int,
                   json_out: bool, label: str, how: str, extra: dict | None = None) -> None:
    """The loop and report of `gdn2q generate`, shared by the PyTorch and onnxruntime paths: ``prefill()`` the
    prompt once, then ``pick`` a token from the logits and ``step`` it through the state, under a progress
    bar; print the text and the decode speed (``how`` ran it), or the result as JSON (``extra`` added)."""
    out: list[int] = []
    t0 = time.perf_counter()
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=json_out) as bar:
        task = bar.add_task("gen", total=max_new_tokens)
        logits = prefill()
        t_prefill = time.perf_counter() - t0
        for _ in range(max_new_tokens):
            out.append(pick(logits))
            bar.advance(task)
            logits = step(out[-1])
    dt = time.perf_counter() - t0 - t_prefill
    text = decode(out)
    result = {"prompt": prompt, "completion": text, "prompt_tokens": len(ids), "new_tokens": len(out),
              "token_ids": out, "decode_tokens_per_s": len(out) / dt if dt > 0 else None, **(extra or {})}
    if json_out:
        print_json(result)
        return
    console.print(f"[bold]{prompt}[/]{text}", highlight=False)
    console.print(f"[dim]{len(ids)} prompt tokens, {len(out)} new tokens, "
                  f"{result['decode_tokens_per_s']:.1f} tokens/s decode ({how})[/]")
