"""Time gdn2q's decode and prefill kernels against upstream fla 0.6.0 in one process on one GPU.

Decode: one step of one layer (H=16, K=V=128) for B sequences, replayed from a CUDA graph, fla's
``fused_recurrent_gdn2`` with its fp32 state against gdn2q's ``decode_step`` with the state stored in each
format. Prefill: ``chunk_gdn2`` (bf16 inputs, fp32 state) against ``chunk_prefill`` leaving an int8 (and
fp32) final state. Reports medians of triton.testing.do_bench, the state traffic (bytes read + written
per step over the time) and the device copy bandwidth measured in the same run: of a 2 GiB copy, and of a
copy moving each decode row's own state bytes.
Writes kernels-<card>.json and .md to --out (kernels-prefill-<card> with --only prefill, so a prefill run does
not replace the decode table). Usage: python tools/bench_kernels.py [--only decode|prefill] [--tune] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import cache, partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))          # gpu_check_kernels, for its state error

from gdn2q.kernels import new_state_pool  # noqa: E402
from gdn2q.kernels.bench import capture_graph  # noqa: E402
from gdn2q.kernels.decode import decode_triton, launch_params, launch_tier  # noqa: E402
from gdn2q.kernels.prefill import default_dot, prefill_triton  # noqa: E402
from gdn2q.quant.state import StateQuantConfig  # noqa: E402

H, K, V = 16, 128, 128
DECODE_B = (1, 8, 64, 256, 1024)
PREFILL_BT = ((1, 2048), (1, 8192), (4, 8192), (1, 32768))
STATES = {"fp32": StateQuantConfig("fp32"), "bf16": StateQuantConfig("bf16"), "int8": StateQuantConfig("int8"),
          "fp8": StateQuantConfig("fp8"), "int8-ef": StateQuantConfig("int8", rounding="error-feedback")}


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    return copy_same_bytes_gbps(2 * 2 ** 31)


@cache
def copy_same_bytes_gbps(nbytes: int) -> float:
    """GB/s of a direct device copy that reads and writes ``nbytes`` in all (medians of do_bench).

    Why a copy of each row's own bytes: a short kernel cannot reach the 2 GiB copy's bandwidth, whose launch and
    ramp are amortised over ~1 ms, and neither can a copy as short as the kernel (docs/kernels.md, the H200
    section); this column says how close a decode step is to the copy of its own bytes under the same harness."""
    x = torch.randn(max(nbytes // 8, 1), device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 4 / ms / 1e6


def graph_us(fn) -> float:
    """Median µs of fn replayed from a CUDA graph (launch gaps removed, as a serving loop would run it)."""
    return do_bench(capture_graph(fn, warmup=3).replay, warmup=25, rep=200, return_mode="median") * 1e3


def _decode_inputs(B: int):
    q, k = torch.randn(B, 1, H, K, device="cuda").bfloat16(), torch.randn(B, 1, H, K, device="cuda").bfloat16()
    v = torch.randn(B, 1, H, V, device="cuda").bfloat16()
    g = -torch.rand(B, 1, H, K, device="cuda") * 0.1
    b = torch.rand(B, 1, H, K, device="cuda").bfloat16()
    w = torch.rand(B, 1, H, V, device="cuda").bfloat16()
    return q, k, v, g, b, w


def _pool(B: int, fmt: StateQuantConfig):
    """A pool of random stored states (never zeros: they can run faster than real data)."""
    pool = new_state_pool(B, H, K, V, fmt, "cuda")
    if fmt.quantized:
        pool.codes.copy_(torch.randint(-100, 100, pool.codes.shape, device="cuda").to(fmt.torch_dtype))
        pool.scales.uniform_(0.005, 0.02)
        if pool.residual is not None:
            pool.residual.copy_(torch.randint(-100, 100, pool.codes.shape, device="cuda").to(fmt.torch_dtype))
    else:
        pool.codes.copy_(torch.randn(B, H, K, V, device="cuda").to(fmt.torch_dtype))
    return pool


def _variants(keys: str, *values: tuple) -> list[dict]:
    return [dict(zip(keys.split(), v, strict=True)) for v in values]


# launch variants swept by --tune (decode_triton keyword arguments), per kind of state
# stages > 1: Triton streams the blocks of each pass through shared memory with asynchronous copies, several
# blocks ahead, so a program waits for memory once per pass instead of once per block.
DECODE_VARIANTS = {
    "float": _variants("num_warps block_v programs_per_sm stages", (4, 64, 4, 1), (2, 32, 8, 1), (2, 32, 10, 1),
                       (4, 32, 8, 1), (2, 32, 8, 3)),
    "quantized": _variants("staged num_warps block_k unroll stages programs_per_sm", (0, 1, 8, 2, 1, 16),
                           (0, 2, 8, 4, 1, 12), (0, 4, 128, 1, 1, 2), (0, 4, 128, 1, 2, 2), (0, 2, 8, 2, 3, 10),
                           (0, 1, 8, 2, 3, 12), (0, 1, 8, 2, 3, 16), (0, 1, 8, 1, 4, 16), (0, 1, 8, 2, 4, 16),
                           # the Gluon kernel (decode_staged.py): 4-warp programs, whole tiles in shared memory
                           (1, 4, None, 1, None, 4), (1, 4, None, 2, None, 4), (1, 4, None, 2, None, 8)),
}


def _decode_us(B: int, fmt: StateQuantConfig, flat, variant: dict | None) -> float:
    slots = torch.randperm(B, device="cuda").to(torch.int32)
    return graph_us(partial(decode_triton, *flat, _pool(B, fmt), slots, fmt, **(variant or {})))


def _variant_error(B: int, fmt: StateQuantConfig, flat, variant: dict) -> float:
    """Worst disagreement of one step's stored state with the reference, as tools/gpu_check_kernels.py
    measures it: in grid steps (int8/fp8/bf16; one step passes) or relative (fp32; 1e-3 passes)."""
    from gpu_check_kernels import state_error

    from gdn2q.kernels import decode_step

    slots = torch.randperm(B, device="cuda")
    kern = _pool(B, fmt)
    ref = new_state_pool(B, H, K, V, fmt, "cuda")
    for a, b in ((ref.codes, kern.codes), (ref.scales, kern.scales), (ref.residual, kern.residual)):
        if a is not None:
            a.copy_(b)
    decode_triton(*flat, kern, slots, fmt, **variant)
    decode_step(*flat, ref, slots, fmt, force="torch")
    return state_error(kern, ref, fmt, slots)


def _tier(B: int) -> str:
    return launch_tier(B * H, torch.cuda.get_device_properties(0).multi_processor_count)


def tune_decode(states=("fp32", "bf16", "int8", "fp8")) -> tuple[dict, list[dict]]:
    """The fastest correct launch variant per (state, load tier), timed at B=1, 64 and 256 (one per tier)."""
    rows, best = [], {}
    for B in (1, 64, 256):
        flat = [t[:, 0] for t in _decode_inputs(B)]
        for name in states:
            fmt = STATES[name]
            times = {}
            for var in DECODE_VARIANTS["quantized" if fmt.quantized else "float"]:
                try:
                    err = _variant_error(B, fmt, flat, var)
                    us = _decode_us(B, fmt, flat, var)
                except Exception as e:   # a variant that does not compile or launch is a failed row
                    print(json.dumps({"B": B, "state": name, **var, "error": repr(e)[:200]}), flush=True)
                    continue
                rows.append({"op": "decode", "B": B, "state": name, **var, "us": us, "state_err": err})
                print(json.dumps(rows[-1]), flush=True)
                if err <= (1e-3 if fmt.dtype == "fp32" else 1.0001):
                    times[json.dumps(var)] = us
            best[(name, _tier(B))] = json.loads(min(times, key=times.get))
            if name == "int8":   # error feedback runs on the Triton kernel only
                triton_only = {v: us for v, us in times.items() if not json.loads(v)["staged"]}
                best[("int8-ef", _tier(B))] = json.loads(min(triton_only, key=triton_only.get))
    return best, rows


def _prefill_inputs(B: int, T: int):
    q, k = torch.randn(B, T, H, K, device="cuda").bfloat16(), torch.randn(B, T, H, K, device="cuda").bfloat16()
    v = torch.randn(B, T, H, V, device="cuda").bfloat16()
    g = -torch.rand(B, T, H, K, device="cuda") * 0.1
    b, w = torch.rand(B, T, H, K, device="cuda").bfloat16(), torch.rand(B, T, H, V, device="cuda").bfloat16()
    return q, k, v, g, b, w


# Launch variants of prefill_triton swept by --tune, the default first. Each runs in its own process, so a
# variant that faults (the previous kernel's 8-warp sequential launch hit an illegal address under Triton 3.6)
# costs only its row; the riskiest ones (8 warps in the sequential kernel) come last.
PREFILL_VARIANTS = (
    {},
    {"block_v": 16},
    {"block_v": 32},
    {"block_v": 64},
    {"stages": 2},
    {"intra_warps": 8},
    {"out_block_v": 128},
    {"score_block_k": 64},
    {"dot_precision": "bf16x3"},    # fp32 intermediates
    {"block_v": 64, "state_warps": 8, "stages": 2},
    {"block_v": 128, "state_warps": 8, "stages": 2},
)


def _prefill_call(inputs, fmt: StateQuantConfig, **variant):
    """A zero-argument prefill launch into a fresh pool (the timed unit of work)."""
    B = inputs[0].shape[0]
    pool = new_state_pool(B, H, K, V, fmt, "cuda")
    slots = torch.arange(B, device="cuda", dtype=torch.int32)
    return partial(prefill_triton, *inputs, pool, slots, fmt, initial=False, **variant)


def _prefill_us(inputs, fmt: StateQuantConfig, **variant) -> float:
    """Median µs of back-to-back calls (what a caller sees, host launch overhead included)."""
    return do_bench(_prefill_call(inputs, fmt, **variant), warmup=25, rep=150, return_mode="median") * 1e3


def _graph_or_none(fn) -> float | None:
    """Median µs replayed from a CUDA graph (device time without host overhead), None if capture fails."""
    try:
        return graph_us(fn)
    except Exception as e:  # e.g. a library that syncs with the host inside the call
        print(f"graph capture failed: {e!r}"[:300], flush=True)
        return None


def _variant_child(spec: str) -> None:
    """Time one launch variant at 1x8192 (int8 final state) and compare its output with the default launch."""
    var = json.loads(spec)
    inputs = _prefill_inputs(1, 8192)
    ref = _prefill_call(inputs, STATES["int8"])()
    o = _prefill_call(inputs, STATES["int8"], **var)()
    torch.cuda.synchronize()
    diff = ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    us = _prefill_us(inputs, STATES["int8"], **var)
    gus = _graph_or_none(_prefill_call(inputs, STATES["int8"], **var))
    print(json.dumps({"us": us, "graph_us": gus, "o_diff_vs_default": diff}), flush=True)


def tune_prefill() -> tuple[dict, list[dict]]:
    """Time each launch variant at 1x8192 in a child process; the fastest that matches the default wins."""
    rows = []
    for var in PREFILL_VARIANTS:
        cmd = [sys.executable, __file__, "--prefill-variant", json.dumps(var)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            res = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
            p, res = None, None
            print(f"prefill variant {var}: {e!r}"[:300], flush=True)
        if res is None:
            err = (p.stderr.strip().splitlines() or ["?"])[-1] if p is not None else "timeout"
            print(f"prefill variant {var} failed: {err}"[:400], flush=True)
            rows.append({"op": "prefill", "B": 1, "T": 8192, "state": "int8", **var, "us": None, "error": err[:300]})
            continue
        rows.append({"op": "prefill", "B": 1, "T": 8192, "state": "int8", **var, **res})
        print(json.dumps(rows[-1]), flush=True)
    good = [r for r in rows if r["us"] is not None and r["o_diff_vs_default"] < 1e-2]
    best = min(good, key=lambda r: r["us"]) if good else dict(PREFILL_VARIANTS[0])
    keys = ("block_v", "state_warps", "stages", "intra_warps", "out_block_v", "score_block_k", "dot_precision")
    return {k: best[k] for k in keys if k in best}, rows


def bench_decode(fla_fn, copy_gbps: float, variants: dict) -> list[dict]:
    rows = []
    for B in DECODE_B:
        q, k, v, g, b, w = _decode_inputs(B)
        h0 = torch.randn(B, H, K, V, device="cuda")
        fla_us = graph_us(partial(fla_fn, q, k, v, g, b, w, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)) if fla_fn else None
        flat = [t[:, 0] for t in (q, k, v, g, b, w)]
        for name, fmt in STATES.items():
            var = variants.get((name, _tier(B)))
            us = _decode_us(B, fmt, flat, var)
            nbytes = 2 * B * H * fmt.bytes_per_head(K, V)
            staged = launch_params(fmt, B * H, torch.cuda.get_device_properties(0).multi_processor_count,
                                   **(var or {}))["staged"]
            rows.append({"op": "decode", "B": B, "T": 1, "state": name, "us": us, "fla_us": fla_us,
                         "speedup": fla_us / us if fla_us else None, "state_GBps": nbytes / us / 1e3,
                         "copy_GBps": copy_gbps, "copy_same_bytes_GBps": copy_same_bytes_gbps(nbytes),
                         "variant": var, "kernel": "gluon-staged" if staged else "triton"})
            print(json.dumps(rows[-1]), flush=True)
        if fla_fn:
            rows.append({"op": "decode", "B": B, "T": 1, "state": "fla-fp32", "us": fla_us, "fla_us": fla_us,
                         "speedup": 1.0, "state_GBps": 2 * B * H * K * V * 4 / fla_us / 1e3,
                         "copy_GBps": copy_gbps, "copy_same_bytes_GBps": copy_same_bytes_gbps(2 * B * H * K * V * 4)})
    return rows


def bench_prefill(fla_fn, copy_gbps: float, variant: dict) -> list[dict]:
    """gdn2q's prefill (default "mixed" products, int8 and fp32 final state; bf16 / bf16x3 / tf32x3 at 1x8192)
    against fla. Each row's state label ends in its dot_precision.

    ``us`` is do_bench of back-to-back calls (host overhead included, as fla's numbers in TARGETS.md);
    ``graph_us`` replays the same call from a CUDA graph (device time only) for both.
    """
    rows = []
    for B, T in PREFILL_BT:
        inputs = _prefill_inputs(B, T)
        h0 = torch.randn(B, H, K, V, device="cuda")
        fla_us = fla_graph_us = None
        if fla_fn:
            fla = partial(fla_fn, *inputs, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
            fla_us = do_bench(fla, warmup=25, rep=200, return_mode="median") * 1e3
            fla_graph_us = _graph_or_none(fla)
        extra = [("int8", d) for d in ("bf16", "bf16x3", "tf32x3")] if (B, T) == (1, 8192) else []
        runs = [("int8", None), ("fp32", None)] + extra
        for name, dot in runs:
            var = {**variant, **({"dot_precision": dot} if dot else {})}
            label = var.get("dot_precision") or default_dot(inputs[0].dtype)
            us = _prefill_us(inputs, STATES[name], **var)
            gus = _graph_or_none(_prefill_call(inputs, STATES[name], **var))
            rows.append({"op": "prefill", "B": B, "T": T, "state": f"{name}-{label}", "us": us,
                         "fla_us": fla_us, "speedup": fla_us / us if fla_us else None, "graph_us": gus,
                         "fla_graph_us": fla_graph_us,
                         "graph_speedup": fla_graph_us / gus if fla_graph_us and gus else None,
                         "state_GBps": None, "copy_GBps": copy_gbps, "Mtok_s": B * T / us,
                         "fla_Mtok_s": B * T / fla_us if fla_us else None, **var})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    """The table of a run. Prefill rows also give both sides replayed from a CUDA graph (device time only):
    back-to-back calls include host launch overhead, which dominates fla's many small launches."""
    def f(x, p=1):
        return "-" if x is None else f"{x:.{p}f}"

    lines = [f"# gdn2q kernels vs fla {meta['versions'].get('fla')} on {meta['card']}", "",
             f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}; device copy bandwidth "
             f"{meta['copy_GBps']:.0f} GB/s (read+write, a 2 GiB copy; \"same-size copy\": a copy moving the row's "
             "own state bytes, timed the same way). H=16, K=V=128, one layer; decode timed as CUDA-graph "
             "replays, prefill as back-to-back calls (µs) and as CUDA-graph replays (graph µs); medians of "
             "triton.testing.do_bench.", "",
             "| op | B | T | state | kernel | µs | fla µs | speedup | graph µs | fla graph µs | graph speedup "
             "| state GB/s | % of copy | % of same-size copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = None if r["state_GBps"] is None else 100 * r["state_GBps"] / r["copy_GBps"]
        same = r.get("copy_same_bytes_GBps")
        pct_same = None if r["state_GBps"] is None or not same else 100 * r["state_GBps"] / same
        lines.append(f"| {r['op']} | {r['B']} | {r['T']} | {r['state']} | {r.get('kernel', '-')} | {f(r['us'])} | "
                     f"{f(r['fla_us'])} | "
                     f"{f(r['speedup'], 2)} | {f(r.get('graph_us'))} | {f(r.get('fla_graph_us'))} | "
                     f"{f(r.get('graph_speedup'), 2)} | {f(r['state_GBps'], 0)} | {f(pct, 0)} | {f(pct_same, 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--only", choices=("decode", "prefill"), default=None)
    ap.add_argument("--tune", action="store_true",
                    help="time launch-parameter variants first and use the fastest in the table")
    ap.add_argument("--states", nargs="+", default=["fp32", "bf16", "int8", "fp8"], choices=list(STATES),
                    help="states --tune sweeps")
    ap.add_argument("--prefill-variant", help=argparse.SUPPRESS)   # child process of tune_prefill
    args = ap.parse_args()
    if args.prefill_variant:
        _variant_child(args.prefill_variant)
        return
    try:
        import fla
        from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2
        fla_version = fla.__version__
    except ImportError:
        chunk_gdn2 = fused_recurrent_gdn2 = None
        fla_version = None
    copy_gbps = copy_bandwidth()
    print(f"copy {copy_gbps:.0f} GB/s", flush=True)
    rows, tuning = [], []
    if args.only in (None, "decode"):
        variants, t_rows = tune_decode(args.states) if args.tune else ({}, [])
        tuning += t_rows
        rows += bench_decode(fused_recurrent_gdn2, copy_gbps, variants)
    if args.only in (None, "prefill"):
        variant, t_rows = tune_prefill() if args.tune else ({}, [])
        tuning += t_rows
        rows += bench_prefill(chunk_gdn2, copy_gbps, variant)
    card = torch.cuda.get_device_name()
    meta = {"card": card, "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                       "fla": fla_version}, "copy_GBps": copy_gbps}
    slug = ("prefill-" if args.only == "prefill" else "") + card.replace(" ", "-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"kernels-{slug}.json").write_text(json.dumps({**meta, "rows": rows, "tuning": tuning}, indent=1))
    Path(args.out, f"kernels-{slug}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
