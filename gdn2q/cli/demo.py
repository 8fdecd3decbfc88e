"""`gdn2q demo`: the main job end to end on the bundled model, in one command (the README's quick start)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from gdn2q.checkpoint import read_checkpoint
from gdn2q.checkpoint.summary import summarize
from gdn2q.cli.app import app, console, guarded
from gdn2q.cli.inspect_model import render
from gdn2q.data import load_tokenizer

DEMO_SEQ_LEN = 256


@app.command()
@guarded
def demo(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt for the generation step.")] = "KING HENRY:",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 40,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Weight recipe for the quantize step.")] = "int8-wo",
    eval_tokens: Annotated[int, typer.Option(min=DEMO_SEQ_LEN, help="Tokens of bundled text to compare on.")] = 4096,
    workdir: Annotated[Path | None, typer.Option(
        help="Keep the calibration file, quantized folder and report here (default: a temporary folder).")] = None,
) -> None:
    """Run the main job on the small GDN-2 model bundled with gdn2q: inspect it, generate with it, then
    calibrate -> quantize -> compare on bundled Shakespeare text and print the comparison table.

    Example: `gdn2q demo`
    """
    from gdn2q import load_model

    console.rule("[bold]1. inspect the bundled model")
    ckpt = read_checkpoint(None)
    render(summarize(ckpt))
    console.rule("[bold]2. generate (prefill, then token-by-token decode from the explicit state)")
    model = load_model()
    tok = load_tokenizer(model.tokenizer_path)
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens)
    console.print(f"[bold]{prompt}[/]{tok.decode(out[0].tolist())}", highlight=False)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="gdn2q-demo.") as tmp:
            main_job(Path(tmp), recipe, eval_tokens)
    else:
        main_job(workdir, recipe, eval_tokens)


def main_job(work: Path, recipe: str, eval_tokens: int) -> None:
    """calibrate -> quantize -> compare, the commands' own code paths, on the bundled model and text."""
    from gdn2q import load_model
    from gdn2q.calib import calibrate_text
    from gdn2q.cli.calibrate import bundled_text, work_progress
    from gdn2q.cli.compare import print_tables
    from gdn2q.cli.quantize import source_dtype
    from gdn2q.eval.compare import compare_models, default_base, eval_ids
    from gdn2q.eval.report import write_report
    from gdn2q.quant import quantize_model
    from gdn2q.quant.folder import save_quantized_folder, summarize_quantized

    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]3. calibrate on bundled text (gdn2q calibrate)")
    with work_progress("calibrating (windows)") as update:
        calib = calibrate_text(load_model(), bundled_text("calib.txt"), seq_len=DEMO_SEQ_LEN, max_tokens=4096,
                               progress=update)
    calib.save(work / "calib.safetensors", force=True)
    console.print(f"{len(calib.tensors)} statistics over {calib.meta['tokens']} tokens -> {work / 'calib.safetensors'}")
    console.rule(f"[bold]4. quantize with {recipe} (gdn2q quantize)")
    model = load_model(dtype=source_dtype(read_checkpoint(None).info))
    quantize_model(model, recipe, calib=calib)
    folder = save_quantized_folder(model, work / recipe, force=True)
    info = summarize_quantized(folder)
    console.print(f"weights {info['bytes']:,} -> {info['bytes_after']:,} bytes "
                  f"({len(info['quantization']['policy']['quantized'])} Linears quantized) -> {folder}")
    console.rule(f"[bold]5. compare {recipe} against the source model (gdn2q compare)")
    candidate = load_model(folder)
    ids = eval_ids(candidate, bundled_text("eval.txt"), DEMO_SEQ_LEN, eval_tokens)
    with work_progress("comparing (windows)") as update:
        result = compare_models(default_base(candidate), candidate, ids, DEMO_SEQ_LEN, progress=update)
    write_report({recipe: result}, work / "report", force=True, title=f"{recipe} vs bundled source")
    print_tables({recipe: result})
