"""What `gdn2q compare --stream` and `gdn2q compare --task recall` do (the compare command dispatches here)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from gdn2q.cli.app import console, print_json
from gdn2q.cli.calibrate import work_progress
from gdn2q.errors import ConfigError
from gdn2q.quant.state import StateQuantConfig


def stream_compare_command(models: list[Path], texts: list[Path], fmt: StateQuantConfig | None, max_tokens: int,
                           bucket: int, device: str, json_out: bool) -> dict:
    """Stream the texts (concatenated) through decode with the candidate's state format; the reference is the
    base weights with an fp32 state. Returns (and prints) {run name: compare result + by_position}."""
    from gdn2q import load_model
    from gdn2q.data import load_tokenizer, read_text
    from gdn2q.eval.compare import default_base
    from gdn2q.eval.stream import StreamRun, stream_compare

    if len(models) > 2:
        raise ConfigError(f"compare takes [BASE] CANDIDATE, got {len(models)} paths")
    candidate = load_model(models[-1] if models else None, device=device)
    if len(models) == 2:
        base = load_model(models[0], device=device)
    else:
        base = default_base(candidate, device) if getattr(candidate, "quantization", None) else candidate
    fmt = fmt or candidate.state_format
    tok = load_tokenizer(base.tokenizer_path)
    ids = torch.tensor(tok.encode("".join(read_text(p) for p in texts)).ids[:max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise ConfigError("the stream needs at least 2 tokens; pass a longer --data")
    name = f"{Path(str(candidate.source_path)).name} state {fmt.label}"
    with work_progress("streaming (token by token)", disable=json_out) as update:
        results = stream_compare(base, [StreamRun(name, fmt, None if candidate is base else candidate)], ids,
                                 bucket=bucket, progress=update)
    result = {**results[name], "base_model": str(base.source_path), "candidate_model": str(candidate.source_path),
              "data": [str(p) for p in texts], "reference": "base weights, fp32 state"}
    if json_out:
        print_json(result)
    return {name: result}


def recall_command(model: Path | None, fmts: list[StateQuantConfig], lengths: list[int] | None, sequences: int,
                   device: str, json_out: bool) -> dict:
    """MQAR recall accuracy per state format and context length (model default: the bundled recall model)."""
    from gdn2q import load_model
    from gdn2q.eval.recall import bundled_recall_model_path, recall_eval
    from gdn2q.eval.stream import StreamRun

    lm = load_model(model or bundled_recall_model_path(), device=device)
    runs = [StreamRun(f.label, f) for f in fmts]
    with work_progress("recall per context length", disable=json_out) as update:
        result = recall_eval(lm, runs, lengths, sequences, progress=update)
    result["model"] = str(lm.source_path)
    if json_out:
        print_json(result)
        return result
    table = Table(title=f"MQAR recall accuracy, {result['task']['num_pairs']} pairs, "
                        f"{result['queries_per_length']} queries per length")
    table.add_column("state")
    table.add_column("bytes/layer", justify="right")
    for length in result["lengths"]:
        table.add_column(f"{length} tok", justify="right")
    table.add_row("fp32 full forward", "-", *(f"{100 * result['full_forward_fp32'][n]:.1f}%"
                                                for n in result["lengths"]))
    for name, r in result["runs"].items():
        table.add_row(name, f"{r['state_bytes_per_layer']['total']:,}",
                      *(f"{100 * r['accuracy'][n]:.1f}%" for n in result["lengths"]))
    console.print(table)
    return result
