"""`gdn2q inspect`: what a checkpoint is, before you quantize it."""

from __future__ import annotations

from rich.table import Table

from gdn2q.checkpoint import read_checkpoint
from gdn2q.checkpoint.summary import summarize
from gdn2q.cli.app import app, console, guarded, print_json
from gdn2q.cli.options import ConfigOpt, JsonOpt, ModelArg


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@guarded
def inspect(model: ModelArg = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Show a checkpoint's format, architecture, parameters and bytes per weight group, and the recurrent
    state's bytes per sequence for each state dtype.

    Example: `gdn2q inspect ../shared/checkpoints/small`
    """
    ckpt = read_checkpoint(model, config)
    if ckpt.is_quantized:
        from gdn2q.quant.folder import summarize_quantized

        info = summarize_quantized(ckpt.path)
    else:
        info = summarize(ckpt)
    if json_out:
        print_json(info)
        return
    render(info)


def render(info: dict) -> None:
    c = info["config"]
    console.print(f"[bold]{info['path']}[/]  format: {info['format']}")
    arch = (f"{c['num_hidden_layers']} layers, d={c['hidden_size']}, GDN-2 heads {c['num_heads']}x{c['head_dim']}"
            f" (value heads {c.get('num_v_heads') or c['num_heads']}, V={int(c['head_dim'] * c['expand_v'])}),"
            f" conv {c['conv_size']}, MLP {c['intermediate_size']}, vocab {c['vocab_size']},"
            f" gate {c['output_gate_activation']}, norm eps {c['norm_eps']:g}")
    console.print(arch)
    if c.get("attn"):
        a = c["attn"]
        console.print(f"sliding-window attention on layers {a['layers']}: {a['num_heads']} heads "
                      f"({a['num_kv_heads']} kv), window {a['window_size']}, rope theta {a['rope_theta']:g}")
    table = Table(title=f"{info['parameters']:,} parameters, {_human(info['bytes'])}")
    has_after = any("bytes_after" in g for g in info["groups"].values())
    for col in ("group", "params", "dtype", "bytes") + (("after", "ratio") if has_after else ()):
        table.add_column(col, justify="left" if col in ("group", "dtype") else "right")
    for name, g in info["groups"].items():
        row = [name, f"{g['params']:,}", ",".join(g["dtypes"]), _human(g["bytes"])]
        if has_after:
            after = g.get("bytes_after", g["bytes"])
            row += [_human(after), f"{after / max(g['bytes'], 1):.2f}"]
        table.add_row(*row)
    console.print(table)
    st = Table(title="recurrent state per sequence")
    for col in ("dtype", "per GDN-2 layer", "all layers", "vs fp32"):
        st.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, r in info["state_bytes_per_sequence"]["recurrent"].items():
        st.add_row(dtype, _human(r["per_layer"]), _human(r["total"]), f"{r['ratio_to_fp32']:.3f}")
    console.print(st)
    q = info.get("quantization")
    if q:
        from gdn2q.quant.state import StateQuantConfig

        fmt = StateQuantConfig(**q.get("state", {}))
        K, V, HV = c["head_dim"], int(c["head_dim"] * c["expand_v"]), c.get("num_v_heads") or c["num_heads"]
        console.print(f"quantized with {q['recipe']}; recurrent state stored as {fmt.label}: "
                      f"{_human(HV * fmt.bytes_per_head(K, V))} per GDN-2 layer per sequence")
