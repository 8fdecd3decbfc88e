"""`gdn2q calibrate`: run real text through a model and save the statistics quantization needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.options import ConfigOpt, ForceOpt, JsonOpt, ModelArg
from gdn2q.errors import UnsupportedError


def bundled_text(name: str) -> Path:
    """Public-domain Shakespeare excerpts shipped with gdn2q: ``calib.txt`` and ``eval.txt``."""
    return Path(str(resources.files("gdn2q") / "assets" / "text" / name))


@contextlib.contextmanager
def work_progress(label: str, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields ``update(done, total)``."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=disable) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="UTF-8 text file, tokenized with the model's tokenizer.json. Default: bundled Shakespeare.",
    show_default=False)]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per window (each starts a fresh state).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]


@app.command()
@guarded
def calibrate(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Calibration file to write (.safetensors).")] = Path(
        "calib.safetensors"),
    data: DataOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Use at most this many tokens.")] = 16384,
    batch_size: BatchOpt = 4,
    clip: Annotated[list[str], typer.Option(
        "--clip", help="Activation statistics per Linear input channel: absmax (always), percentile, mse "
                       "(repeat the option for several).")] = ["absmax"],  # noqa: B006 (typer needs a list)
    percentile: Annotated[float, typer.Option(min=50.0, max=100.0, help="Percentile for --clip percentile.")] = 99.99,
    device: DeviceOpt = "cpu",
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Record per-channel input ranges of every Linear, the gate values (b, w, decay g) of every GDN-2 layer and
    the recurrent state's range per (layer, head, key row), over real text run through the recurrence.

    The same model and text always give the same file, byte for byte. quantize uses it for SmoothQuant
    (w8a8-int8) and static state scales.

    Example: `gdn2q calibrate ../shared/checkpoints/small --data shakespeare_calib.txt -o calib.safetensors`
    """
    from gdn2q import load_model
    from gdn2q.calib import calibrate_text

    if output.exists() and not force:
        from gdn2q.errors import OutputExistsError

        raise OutputExistsError(output)
    lm = load_model(model, device=device, config=config)
    if getattr(lm, "quantization", None) is not None:
        raise UnsupportedError(f"{model}: already quantized; calibrate its source model "
                               f"({lm.quantization['source']['path']})")
    text = data or bundled_text("calib.txt")
    with work_progress("calibrating (windows)", disable=json_out) as update:
        calib = calibrate_text(lm, text, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                               clip=tuple(dict.fromkeys(["absmax", *clip])), percentile=percentile, progress=update)
    calib.save(output, force=force)
    result = {"output": str(output), "tensors": len(calib.tensors), **calib.meta}
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {output}: {len(calib.tensors)} statistics over {calib.meta['tokens']} tokens "
                      f"({calib.meta['windows']} windows of {seq_len}) of {Path(text).name}")
