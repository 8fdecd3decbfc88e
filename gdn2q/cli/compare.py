"""`gdn2q compare`: how far a quantized model is from its base, token by token, on real text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.calibrate import BatchOpt, DataOpt, DeviceOpt, SeqLenOpt, bundled_text, work_progress
from gdn2q.cli.options import ForceOpt
from gdn2q.cli.state_options import (
    CompareStateOpt,
    ConvStateOpt,
    StateGranularityOpt,
    StateResidualOpt,
    StateRoundingOpt,
    StateScalesOpt,
    compare_state_format,
)
from gdn2q.errors import ConfigError, OutputExistsError
from gdn2q.eval.report import SUMMARY_COLUMNS, summary_rows


def print_tables(results: dict[str, dict]) -> None:
    table = Table(title="base vs candidate")
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for row in summary_rows(results):
        table.add_row(*row)
    console.print(table)
    for name, r in results.items():
        pos = Table(title=f"{name}: by position (drift)")
        for col in ("positions", "KL mean", "top-1 agree"):
            pos.add_column(col, justify="right")
        for b in r["by_position"]:
            pos.add_row(f"{b['start']}-{b['end'] - 1}", f"{b['kl_mean']:.5f}", f"{100 * b['top1_agreement']:.2f}%")
        console.print(pos)


@app.command()
@guarded
def compare(
    models: Annotated[list[Path] | None, typer.Argument(
        help="[BASE] CANDIDATE. With only CANDIDATE (a quantized folder), BASE is its source model in the "
             "precision it was quantized from. With --stream: default the bundled model (its own weights with an "
             "fp32 state are the base); with --task recall: the MQAR model (default: the bundled one).",
        show_default=False)] = None,
    data: DataOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Score at most this many tokens.")] = 32768,
    batch_size: BatchOpt = 4,
    stream: Annotated[int | None, typer.Option(
        "--decode-step", min=1,
        help="Feed windows this many tokens at a time through the decode state (default: only models that "
             "store their state quantized, one token at a time, as a server decodes).")] = None,
    json_file: Annotated[str | None, typer.Option(
        "--json", help="Write the results as JSON to this file ('-' prints them instead of tables).")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Folder to write report.md, drift.png and compare.json into.")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    long_stream: Annotated[bool, typer.Option(
        "--stream", help="Stream --data (+ --concat files) as ONE sequence, token by token through the decode "
                         "state, and report KL/top-1 against the fp32-state base by position (--bucket).")] = False,
    concat: Annotated[list[Path] | None, typer.Option(
        "--concat", help="With --stream: more text files appended after --data (a longer stream).")] = None,
    bucket: Annotated[int, typer.Option("--bucket", min=1, help="With --stream: tokens per position bucket.")] = 4096,
    task: Annotated[str | None, typer.Option(
        "--task", help="recall: MQAR recall accuracy per state format at 1x, 2x, 4x and 8x the trained length.")
    ] = None,
    lengths: Annotated[str | None, typer.Option(
        "--lengths", help="With --task recall: context lengths, comma-separated (default 1x-8x trained).")] = None,
    sequences: Annotated[int, typer.Option("--sequences", min=1, help="With --task recall: sequences per length.")
    ] = 32,
    state: CompareStateOpt = None,
    state_rounding: StateRoundingOpt = "nearest",
    state_granularity: StateGranularityOpt = "row",
    state_scales: StateScalesOpt = "dynamic",
    conv_state: ConvStateOpt = "fp32",
    state_residual: StateResidualOpt = "full",
) -> None:
    """Perplexity of both models, token-level KL(base || candidate) (mean and 99.9th percentile), top-1
    agreement, and the same by position in the window (drift), on windows of --seq-len tokens.

    Example: `gdn2q compare small-int8 --data shakespeare_eval.txt --seq-len 512 --report report`

    Long context: `gdn2q compare small --stream --state int8 --state-rounding error-feedback --data eval.txt`

    Retrieval: `gdn2q compare --task recall` (every state dtype x rounding mode, bundled MQAR model)
    """
    from gdn2q import load_model
    from gdn2q.cli.state_eval import recall_command, stream_compare_command
    from gdn2q.eval.compare import compare_models, default_base, eval_ids
    from gdn2q.eval.report import write_json, write_report

    models = models or []
    fmt = compare_state_format(state, state_rounding, state_granularity, state_scales, conv_state,
                               state_residual)
    if task is not None:
        if task != "recall":
            raise ConfigError(f"unknown --task {task!r}; the task compare knows is: recall")
        from gdn2q.eval.stream import grid_runs

        try:
            lens = [int(x) for x in lengths.split(",")] if lengths else None
        except ValueError as e:
            raise ConfigError(f"--lengths {lengths!r}: give whole numbers separated by commas, e.g. 256,512") from e
        recall_command(models[-1] if models else None, [fmt] if fmt else [r.fmt for r in grid_runs()], lens,
                       sequences, device, json_file == "-")
        return
    if long_stream:
        texts = [data or bundled_text("eval.txt"), *(concat or [])]
        results = stream_compare_command(models, texts, fmt, max_tokens, bucket, device, json_file == "-")
        name, result = next(iter(results.items()))
        if report is not None:
            write_report(results, report, force=force, title=f"{name} vs fp32 state")
        if json_file not in (None, "-"):
            write_json(result, Path(json_file), force=force)
        if json_file != "-":
            print_tables(results)
        return
    if not 1 <= len(models) <= 2:
        raise ConfigError(f"compare takes [BASE] CANDIDATE, got {len(models)} paths")
    for out in (report, Path(json_file) if json_file not in (None, "-") else None):
        if out is not None and out.exists() and not force:
            raise OutputExistsError(out)
    candidate = load_model(models[-1], device=device)
    base = load_model(models[0], device=device) if len(models) == 2 else default_base(candidate, device)
    if fmt is not None:
        candidate.state_format = fmt
    text = data or bundled_text("eval.txt")
    ids = eval_ids(candidate, text, seq_len, max_tokens)
    with work_progress("comparing (windows)", disable=json_file == "-") as update:
        result = compare_models(base, candidate, ids, seq_len, batch_size=batch_size, stream=stream, progress=update)
    result = {**result, "base_model": str(base.source_path), "candidate_model": str(candidate.source_path),
              "data": str(text), "recipe": (getattr(candidate, "quantization", None) or {}).get("recipe")}
    name = Path(models[-1]).name
    if report is not None:
        write_report({name: result}, report, force=force, title=f"{name} vs {Path(base.source_path).name}")
    if json_file == "-":
        print_json(result)
        return
    if json_file is not None:
        write_json(result, Path(json_file), force=force)
    print_tables({name: result})
    if report is not None:
        console.print(f"wrote {report}/report.md, drift.png, compare.json")
