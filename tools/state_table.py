"""Measure recurrent-state formats and write docs/state-quantization.md (tables, JSON, drift plot).

Each measuring step writes one JSON under docs/benchmarks/; ``render`` builds the page from whatever JSON is
there, so every figure in the page comes from a command below (listed in the page itself):

    python tools/state_table.py stream --model ../shared/checkpoints/small --runs long --max-tokens 65536 \\
        --data ../shared/data/corpus/shakespeare_eval.txt --weights int8-wo \\
        --out docs/benchmarks/state_stream_long_small.json
    python tools/state_table.py stream --model ../shared/checkpoints/small --runs grid --max-tokens 16384 \\
        --data ../shared/data/corpus/shakespeare_eval.txt --weights int8-wo --bucket 2048 \\
        --out docs/benchmarks/state_stream_grid_small.json
    python tools/state_table.py stream --model ../shared/checkpoints/small --runs variants --max-tokens 8192 \\
        --data ../shared/data/corpus/shakespeare_eval.txt --bucket 2048 --out docs/benchmarks/state_variants_small.json
    python tools/state_table.py stream --model ../shared/checkpoints/small --runs residual --max-tokens 65536 \\
        --data ../shared/data/corpus/shakespeare_eval.txt --out docs/benchmarks/state_stream_residual_small.json
    python tools/state_table.py recall --out docs/benchmarks/state_recall_mqar.json
    python tools/state_table.py recall --runs residual --out docs/benchmarks/state_recall_residual.json
    python tools/state_table.py sensitivity --model ../shared/checkpoints/small \\
        --data ../shared/data/corpus/shakespeare_eval.txt --out docs/benchmarks/state_sensitivity_small.json
    python tools/state_table.py render
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "benchmarks"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stream_main(a: argparse.Namespace) -> None:
    from gdn2q import load_model
    from gdn2q.data import load_tokenizer, read_text
    from gdn2q.eval.stream import StreamRun, grid_runs, stream_compare
    from gdn2q.quant.state import StateQuantConfig

    model = load_model(a.model)
    tok = load_tokenizer(model.tokenizer_path)
    ids = torch.tensor(tok.encode("".join(read_text(p) for p in a.data)).ids, dtype=torch.long)
    if a.max_tokens:
        ids = ids[:a.max_tokens]
    runs = {"grid": grid_runs, "variants": variant_runs, "long": long_runs, "residual": residual_runs}[a.runs]()
    if a.weights:
        from gdn2q.quant import quantize_model

        wq = quantize_model(copy.deepcopy(model), a.weights)
        states = [StateQuantConfig("int8", rounding="error-feedback")]
        if a.runs != "long":
            states = [StateQuantConfig(), *states, StateQuantConfig("fp8", rounding="nearest")]
        for fmt in states:
            runs.append(StreamRun(f"{a.weights} + {fmt.label}", fmt, wq))
    log(f"streaming {ids.numel()} tokens of {', '.join(map(str, a.data))} through {len(runs)} runs")
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 60:
            last[0] = time.perf_counter()
            log(f"{done}/{total} tokens, {(time.perf_counter() - t0) / max(done, 1) * 1e3:.1f} ms/token")

    results = stream_compare(model, runs, ids, segment=a.segment, bucket=a.bucket, progress=progress)
    out = {"command": "python " + " ".join(sys.argv), "model": str(a.model), "data": [str(p) for p in a.data],
           "tokens": ids.numel(), "seconds": time.perf_counter() - t0, "torch": torch.__version__,
           "reference": "same weights, fp32 state", "runs": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


def recall_main(a: argparse.Namespace) -> None:
    from gdn2q import load_model
    from gdn2q.eval.recall import bundled_recall_model_path, recall_eval
    from gdn2q.eval.stream import grid_runs

    model = load_model(a.model or bundled_recall_model_path())
    t0 = time.perf_counter()
    runs = residual_runs() if a.runs == "residual" else grid_runs()
    result = recall_eval(model, runs, sequences=a.sequences,
                         progress=lambda d, n: log(f"length {d}/{n} done"))
    out = {"command": "python " + " ".join(sys.argv), "model": str(model.source_path),
           "seconds": time.perf_counter() - t0, "torch": torch.__version__, **result}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


def long_runs():
    """The formats worth following to 64k+ tokens on a shared CPU (the grid's other cells: a shorter stream)."""
    from gdn2q.eval.stream import StreamRun
    from gdn2q.quant.state import StateQuantConfig

    fmts = [StateQuantConfig("int8", rounding="error-feedback"), StateQuantConfig("fp8", rounding="nearest")]
    return [StreamRun(f.label, f) for f in fmts]


def sensitivity_main(a: argparse.Namespace) -> None:
    from gdn2q import load_model
    from gdn2q.data import load_tokenizer, tokenize_file, windows
    from gdn2q.quant.sensitivity import EvalSet, auto_policy, sensitivity
    from gdn2q.quant.state import StateQuantConfig

    model = load_model(a.model)
    ids = tokenize_file(load_tokenizer(model.tokenizer_path), a.data, max_tokens=a.seq_len * a.windows)
    evalset = EvalSet.build(model, windows(ids, a.seq_len))
    t0 = time.perf_counter()
    ranking = sensitivity(model, evalset, "int8-wo", StateQuantConfig("int8"))
    log("ranking done")
    auto = auto_policy(model, evalset, ranking, a.max_ppl_increase / 100, "int8-wo")
    out = {"command": "python " + " ".join(sys.argv), "model": str(a.model), "data": str(a.data),
           "tokens": int(evalset.windows.numel()), "seconds": time.perf_counter() - t0, "ranking": ranking,
           "auto": auto}
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


def residual_runs():
    """The 4-bit error-feedback residual, followed as far as the long stream."""
    from gdn2q.eval.stream import StreamRun
    from gdn2q.quant.state import StateQuantConfig

    fmt = StateQuantConfig("int8", rounding="error-feedback", residual="int4")
    return [StreamRun(fmt.label, fmt)]


def variant_runs():
    """Beyond the dtype x rounding grid: 4-bit residual, per-head scales, int8/fp8 conv windows."""
    from gdn2q.eval.stream import StreamRun
    from gdn2q.quant.state import StateQuantConfig

    fmts = [StateQuantConfig(), StateQuantConfig("int8", "row", "error-feedback"),
            StateQuantConfig("int8", "row", "error-feedback", residual="int4"),
            StateQuantConfig("int8", "row", "error-feedback", conv="int8", residual="int4"),
            StateQuantConfig("int8", "head", "error-feedback"),
            StateQuantConfig("int8", "head", "nearest"), StateQuantConfig("fp8", "head", "nearest"),
            StateQuantConfig("int8", "row", "error-feedback", conv="int8"),
            StateQuantConfig("fp8", "row", "nearest", conv="fp8"), StateQuantConfig("bf16", conv="bf16")]
    return [StreamRun(f.label, f) for f in fmts]


def pct(x: float) -> str:
    return f"{100 * x:+.3f}%"


def stream_table(runs: dict[str, dict]) -> list[str]:
    from gdn2q.eval.report import markdown

    rows = [[name, r["state"]["dtype"], r["state"]["rounding"] if r["state"]["dtype"] in ("int8", "fp8") else "-",
             f"{r['state_bytes_per_layer']['recurrent']:,}", f"{r['candidate']['ppl']:.3f}", pct(r["ppl_increase"]),
             f"{r['kl_mean']:.6f}", f"{r['kl_p999']:.4f}", f"{100 * r['top1_agreement']:.2f}%"]
            for name, r in runs.items()]
    return [markdown(("run", "state", "rounding", "state bytes/layer", "ppl", "ppl change vs fp32 state",
                      "KL mean", "KL p99.9", "top-1 agree"), rows)]


def bytes_table() -> list[str]:
    from gdn2q import GDN2Config
    from gdn2q.eval.report import markdown
    from gdn2q.eval.stream import grid_runs, state_bytes
    from gdn2q.quant.state import StateQuantConfig

    shapes = {"small (3 x 128 x 128)": GDN2Config(hidden_size=384, num_heads=3, head_dim=128, vocab_size=4096),
              "1.3B layer (16 x 128 x 128)": GDN2Config(hidden_size=2048, num_heads=16, head_dim=128)}
    fmts = [r.fmt for r in grid_runs() if r.fmt.rounding != "stochastic"]
    fmts += [StateQuantConfig("int8", "head"), StateQuantConfig("int8", rounding="error-feedback", residual="int4"),
             StateQuantConfig("int8", rounding="error-feedback", conv="int8", residual="int4")]
    rows = []
    for fmt in fmts:
        row = [fmt.label]
        for cfg in shapes.values():
            b, ref = state_bytes(cfg, fmt), state_bytes(cfg, StateQuantConfig())
            row += [f"{b['recurrent']:,}", f"{b['recurrent'] / ref['recurrent']:.3f}", f"{b['total']:,}"]
        rows.append(row)
    header = ["format"]
    for name in shapes:
        header += [f"{name}: recurrent bytes", "x fp32", "+ conv windows"]
    return [markdown(header, rows)]


def render_main(a: argparse.Namespace) -> None:
    """Build docs/state-quantization.md (and the drift PNG) from the JSON the other steps wrote."""
    from gdn2q.eval.report import markdown

    def load(name: str) -> dict | None:
        p = BENCH / name
        return json.loads(p.read_text()) if p.is_file() else None

    long, grid, variants, recall = (load(f"state_{n}.json") for n in
                                    ("stream_long_small", "stream_grid_small", "variants_small", "recall_mqar"))
    sens = load("state_sensitivity_small.json")
    for main, extra in ((long, load("state_stream_residual_small.json")), (recall, load("state_recall_residual.json"))):
        if main and extra:   # same text/sequences and seed, so the same reference: one table
            main["runs"].update(extra["runs"])
            main["command"] += "\n" + extra["command"]
    out = [PAGE_HEAD, "## State bytes per sequence per layer\n",
           "Computed from the formats (`gdn2q.eval.stream.state_bytes`): codes + fp32 scales (+ the error-feedback "
           "residual); conv windows are the q/k/v short-conv windows (fp32 unless a conv format is named).\n",
           *bytes_table()]
    commands = []
    if long:
        commands.append(long["command"])
        checks = ["Perplexity budget (1%) and drift: KL mean of the first and the last position bucket, and "
                  "the largest bucket:\n"]
        for name, r in long["runs"].items():
            kls = [b["kl_mean"] for b in r["by_position"]]
            checks.append(f"- {name}: perplexity change {pct(r['ppl_increase'])} over {r['tokens']:,} tokens "
                          f"({'within' if r['ppl_increase'] <= 0.01 else 'OVER'} the 1% budget); KL first "
                          f"{kls[0]:.6f}, last {kls[-1]:.6f}, largest {max(kls):.6f} "
                          f"(last / first = {kls[-1] / kls[0]:.2f})")
        out += [f"\n## Long stream: {long['tokens']:,} tokens of {Path(long['data'][0]).name}, token by token "
                f"(`{Path(long['model']).name}`)\n",
                "Reference: the same weights with an fp32 state (perplexity "
                f"{next(iter(long['runs'].values()))['base']['ppl']:.3f}). Every run stores its state in its format "
                "between every two tokens.\n", *stream_table(long["runs"]), "\n", *checks, "",
                "![drift over 64k tokens](state_drift_small.png)\n"]
        from gdn2q.eval.report import plot_drift

        plot_drift(long["runs"], REPO / "docs" / "state_drift_small.png", where="position in the stream (tokens)",
                   reference="fp32 state", title=f"{Path(long['model']).name}: drift over {long['tokens']:,} tokens",
                   log_kl=True, figsize=(11, 4), marker=".", dpi=90)
        out.append("KL by position (bucket means):\n")
        names = list(long["runs"])
        first = long["runs"][names[0]]["by_position"]
        rows = [[f"{b['start']:,}-{b['end'] - 1:,}",
                 *(f"{long['runs'][n]['by_position'][i]['kl_mean']:.6f}" for n in names)]
                for i, b in enumerate(first)]
        out.append(markdown(("positions", *names), rows))
    if grid:
        commands.append(grid["command"])
        out += [f"\n## Every state dtype x rounding mode: {grid['tokens']:,} tokens, token by token\n",
                *stream_table(grid["runs"])]
    if variants:
        commands.append(variants["command"])
        out += [f"\n## Granularity and conv-window variants: {variants['tokens']:,} tokens\n",
                *stream_table(variants["runs"])]
    if recall:
        commands.append(recall["command"])
        lengths = [str(n) for n in recall["lengths"]]
        rows = [["fp32 state, 256-token forwards (prefill)", "-",
                 *(f"{100 * recall['full_forward_fp32'][n]:.1f}%" for n in lengths)]]
        ref = recall["runs"]["fp32"]["accuracy"]
        worst = {}
        for name, r in recall["runs"].items():
            rows.append([name, f"{r['state_bytes_per_layer']['total']:,}",
                         *(f"{100 * r['accuracy'][n]:.1f}%" for n in lengths)])
            worst[name] = max(ref[n] - r["accuracy"][n] for n in lengths)
        t = recall["task"]
        out += [f"\n## Recall (MQAR): {t['num_pairs']} key-value pairs, trained at {t['trained_length']} tokens\n",
                f"Bundled model `gdn2q/assets/mqar` ({recall['queries_per_length']:,} queries per length, the same "
                "sequences for every format; every token decoded through the stored state):\n",
                markdown(("state", "bytes/layer", *(f"{n} tokens" for n in lengths)), rows),
                f"\nfp32-state accuracy at the trained length: {100 * ref[lengths[0]]:.1f}%. Largest drop below the "
                "fp32 state at any length (points): "
                + ", ".join(f"{n} {100 * w:.1f}" for n, w in worst.items() if n != "fp32") + ".\n",
                "The model itself (fp32 state) recalls well only near its trained length: it was trained at one "
                "length, so longer noise gaps are out of distribution. What the table measures is how far each "
                "format moves away from the fp32 state at the same length.\n", *mqar_section()]
    if sens:
        commands.append(sens["command"])
        rows = [[str(i), r["group"], r["what"], f"{r['kl_mean']:.6f}", pct(r["ppl_increase"])]
                for i, r in enumerate(sens["ranking"], 1)]
        out += [f"\n## Sensitivity of `small` ({sens['tokens']:,} tokens)\n",
                markdown(("rank", "group", "quantized as", "KL mean", "ppl change"), rows)]
        if "auto" in sens:
            au = sens["auto"]
            out.append(f"\n`--recipe auto --max-ppl-increase {100 * au['max_ppl_increase']:g}`: quantize "
                       f"{', '.join(au['quantized_groups'])}; keep {', '.join(au['kept_groups'])}; state "
                       f"{au['state']['dtype']}/{au['state']['rounding']}; measured ppl change "
                       f"{pct(au['result']['ppl_increase'])}. Apply with `gdn2q quantize MODEL "
                       f"{au['quantize_options']}`.\n")
    out += ["\n## Commands that produced this page\n", "```", *commands, "python tools/state_table.py render", "```",
            PAGE_TAIL]
    (REPO / "docs" / "state-quantization.md").write_text("\n".join(out) + "\n")
    log("wrote docs/state-quantization.md")


def mqar_section() -> list[str]:
    """How the bundled recall model was trained, from the logs shipped beside it."""
    from gdn2q.eval.report import markdown

    folder = REPO / "gdn2q" / "assets" / "mqar"
    rows = []
    for p in sorted(folder.glob("train_log_phase*.json")):
        d = json.loads(p.read_text())
        h = d["history"]
        by_pairs = d.get("accuracy_by_pairs") or {}
        rows.append([p.stem.removeprefix("train_log_"), f"`{d['command']}`", d["device"], f"{d['train_seconds']:.0f}",
                     str(h[-1]["step"] if h else "-"), ", ".join(str(x) for x in d["settings"]["stages"]),
                     ", ".join(f"{k}: {100 * v:.1f}%" for k, v in by_pairs.items()) or "-"])
    if not rows:
        return []
    return ["\nThe recall model (2 GDN-2 layers, `tools/train_mqar.py`, curriculum over the number of pairs):\n",
            markdown(("phase", "command", "device", "train s", "last logged step", "curriculum (max pairs)",
                      "fp32 accuracy by pairs at the trained length"), rows)]


PAGE_HEAD = """# Recurrent-state quantization

A GDN-2 server keeps, per sequence and layer, a K x V recurrent state per value head (plus three short-conv
windows) between decode steps. gdn2q stores it in `fp32`, `bf16`, `int8` or `fp8` (e4m3) with fp32 scales, one per
(head, key row) by default (`--state-granularity head`: one per head), rounded `nearest`, `stochastic` or with
`error-feedback` (the rounding residual is stored beside the codes and added back at the next store), with
dynamic (per-store absmax) or static (calibrated) scales. The state is stored after every decoded token and at
the end of every prefill, exactly as a server would keep it (`gdn2q.quant.state`, `gdn2q.model.state`).

    gdn2q quantize MODEL --recipe int8-wo --state int8 --state-rounding error-feedback -o out
    gdn2q compare MODEL --stream --state int8 --state-rounding error-feedback --data eval.txt --json -
    gdn2q compare --task recall
    gdn2q sensitivity MODEL --data eval.txt --recipe auto --max-ppl-increase 1

Everything below is written by `tools/state_table.py` (commands at the end); no figure is typed by hand.
"""

PAGE_TAIL = """
Notes: the streams run on CPU; `compare --stream` and these tables use the per-token decode path with the
projections batched over 256-token segments (`GDN2LayerState.every_token`), which computes what one-token
decode calls compute (tested in tests/test_state_formats.py). Perplexity changes this small are within the
noise of a single text (a lossy state can even lower perplexity); KL and top-1 agreement against the fp32 state
are the fidelity measures. Error feedback with a full residual stores a residual the size of the codes, so an
int8 state with error feedback takes as many bytes as a bf16 state; the 4-bit residual (`--state-residual int4`)
keeps error feedback's accuracy at a fraction of that cost (tables above).
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stream", help="stream a text through every state format (token by token)")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--data", type=Path, nargs="+", required=True, help="text files, concatenated in order")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--weights", help="also stream a weight-quantized copy (recipe name, e.g. int8-wo)")
    s.add_argument("--runs", choices=("grid", "long", "variants", "residual"), default="grid",
                   help="grid: every dtype x rounding; long: the few followed to 64k+; variants: granularity/conv; "
                        "residual: the 4-bit error-feedback residual")
    s.add_argument("--segment", type=int, default=256)
    s.add_argument("--bucket", type=int, default=4096)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("recall", help="MQAR recall accuracy per state format and context length")
    r.add_argument("--model", type=Path, help="default: the bundled MQAR model")
    r.add_argument("--sequences", type=int, default=64)
    r.add_argument("--runs", choices=("grid", "residual"), default="grid")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path, required=True)
    z = sub.add_parser("sensitivity", help="rank weight groups + state by KL, then the auto policy")
    z.add_argument("--model", type=Path, required=True)
    z.add_argument("--data", type=Path, required=True)
    z.add_argument("--seq-len", type=int, default=256)
    z.add_argument("--windows", type=int, default=8)
    z.add_argument("--max-ppl-increase", type=float, default=1.0, help="percent")
    z.add_argument("--threads", type=int, default=1)
    z.add_argument("--out", type=Path, required=True)
    sub.add_parser("render", help="write docs/state-quantization.md from the JSON files")
    a = p.parse_args(argv)
    torch.set_num_threads(getattr(a, "threads", 1))
    {"stream": stream_main, "recall": recall_main, "sensitivity": sensitivity_main, "render": render_main}[a.cmd](a)


if __name__ == "__main__":
    main()
