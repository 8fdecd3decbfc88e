"""`gdn2q sensitivity`: which groups of a GDN-2 model quantize cheaply, and the best policy within a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.calibrate import DataOpt, DeviceOpt, bundled_text, work_progress
from gdn2q.cli.options import ConfigOpt, JsonOpt, ModelArg
from gdn2q.cli.state_options import StateOpt, StateRoundingOpt, state_format
from gdn2q.errors import ConfigError
from gdn2q.quant.state import StateQuantConfig


@app.command()
@guarded
def sensitivity(
    model: ModelArg = None,
    data: DataOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per evaluation window.")] = 256,
    windows: Annotated[int, typer.Option("--windows", min=1, help="Evaluation windows (batched).")] = 8,
    weights: Annotated[str, typer.Option(
        "--weights", help="Weight recipe each group is quantized with (see gdn2q quantize --help).")] = "int8-wo",
    state: StateOpt = "int8",
    state_rounding: StateRoundingOpt = "nearest",
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="'auto': then search the most compressed policy within --max-ppl-increase.")] = None,
    max_ppl_increase: Annotated[float, typer.Option(
        "--max-ppl-increase", min=0.0, help="Perplexity budget for --recipe auto, in percent.")] = 1.0,
    device: DeviceOpt = "cpu",
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Quantize one group at a time (q/k/v, b_proj, w_proj, f_proj, g_proj, o_proj, MLP, lm_head with
    --weights; the recurrent state with --state) and rank the groups by KL(base || quantized) on real text.

    With `--recipe auto` it then adds groups from the least sensitive on while perplexity stays within
    --max-ppl-increase percent, picks the smallest state format that still fits, and prints the
    `gdn2q quantize` options that apply the policy.

    Example: `gdn2q sensitivity ../shared/checkpoints/small --data eval.txt --recipe auto --max-ppl-increase 1`
    """
    from gdn2q import load_model
    from gdn2q.data import load_tokenizer, tokenize_file
    from gdn2q.data import windows as split_windows
    from gdn2q.quant.sensitivity import EvalSet, auto_policy
    from gdn2q.quant.sensitivity import sensitivity as rank_groups

    if recipe not in (None, "auto"):
        raise ConfigError(f"--recipe {recipe!r}: sensitivity searches policies only with --recipe auto; "
                          "use --weights to choose the recipe each group is quantized with")
    fmt = state_format(state, state_rounding)
    base = load_model(model, device=device, config=config)
    text = data or bundled_text("eval.txt")
    ids = tokenize_file(load_tokenizer(base.tokenizer_path), text, max_tokens=seq_len * windows, min_tokens=seq_len)
    evalset = EvalSet.build(base, split_windows(ids, seq_len))
    with work_progress("quantizing one group at a time", disable=json_out) as update:
        ranking = rank_groups(base, evalset, weights, fmt, progress=update)
    result: dict = {"model": str(base.source_path), "data": str(text), "tokens": int(evalset.windows.numel()),
                    "weights": weights, "state": fmt.to_dict(), "ranking": ranking}
    if recipe == "auto":
        with work_progress("searching the policy", disable=json_out) as update:
            result["auto"] = auto_policy(base, evalset, ranking, max_ppl_increase / 100, weights, progress=update)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"sensitivity of {Path(str(base.source_path)).name} ({result['tokens']} tokens)")
    for col in ("rank", "group", "quantized as", "KL mean", "top-1 agree", "ppl change", "bytes saved"):
        table.add_column(col, justify="left" if col in ("group", "quantized as") else "right")
    for i, r in enumerate(ranking, 1):
        table.add_row(str(i), r["group"], r["what"], f"{r['kl_mean']:.6f}", f"{100 * r['top1_agreement']:.2f}%",
                      f"{100 * r['ppl_increase']:+.3f}%", f"{r['bytes_saved']:,}")
    console.print(table)
    if "auto" in result:
        a = result["auto"]
        console.print(f"auto policy (budget {max_ppl_increase}%): quantize {', '.join(a['quantized_groups']) or '-'};"
                      f" keep {', '.join(a['kept_groups'])}; state {StateQuantConfig(**a['state']).label}")
        console.print(f"measured: ppl change {100 * a['result']['ppl_increase']:+.3f}%, "
                      f"KL {a['result']['kl_mean']:.6f}")
        console.print(f"apply it: [bold]gdn2q quantize MODEL {a['quantize_options']}[/]")
