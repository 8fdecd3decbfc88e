"""The skinny Triton fp8 GEMM (gdn2q.kernels.fp8_gemm) against torch._scaled_mm on the 1.3B decode projections.

For each fused projection of KernelLM (in_proj, o_proj, gate_up, down) at M=64 and M=256 it checks every launch
configuration of a small sweep (the heuristic's default, BLOCK_N x BLOCK_K, pipeline depth, split count) and
``torch._scaled_mm`` against the fp64 product of the same e4m3 codes (max |y - ref| / max |ref|; bf16 outputs
carry their own 2^-9 rounding), then times them. Only o_proj and down may split K: KernelLM consumes their fp32
partial sums in the next add_rms_norm. Times are medians of triton.testing.do_bench over a CUDA graph that
runs the product once on each of enough weight copies to overflow the L2 cache (a decode step streams every
layer's weights once), divided by the copies; GB/s counts weight bytes (bf16 cuBLAS, for reference, its own).
A configuration that fails to compile or launch is a failed row; * marks the heuristic's default. GPU only.
Writes fp8-gemm-<card>.json to --out. Usage: python tools/bench_fp8_gemm.py [--m 64 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2q.kernels.bench import CONFIG_1B3  # noqa: E402
from gdn2q.kernels.fp8_gemm import GemmConfig, fp8_gemm, gemm_config, sm_count  # noqa: E402
from gdn2q.kernels.fp8_linear import quantize_rows_reference, quantize_weight_fp8  # noqa: E402

STREAM_BYTES = 256 << 20   # weight copies per timed graph: well past the 50-60 MB L2 of an H100/H200


def shapes() -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, may split) of the fused fp8 projections of one KernelLM layer (as bench._fuse builds)."""
    c = CONFIG_1B3
    n_in = 3 * c.key_dim + 2 * c.value_dim + 2 * c.head_v_dim   # q k v b w + f_proj[0], g_proj[0] (rank head_v_dim)
    return {"in_proj": (n_in, c.hidden_size, False), "o_proj": (c.hidden_size, c.value_dim, True),
            "gate_up": (2 * c.mlp_size, c.hidden_size, False), "down": (c.hidden_size, c.mlp_size, True)}


def sweep(M: int, N: int, K: int, sms: int, split: bool) -> list[GemmConfig]:
    """The default launch and ~8 neighbours, deduplicated."""
    base = gemm_config(M, N, K, sms, allow_split=split)
    variants: list[dict] = [{}]
    variants += [{"block_n": bn, "block_k": bk} for bn in (32, 64, 128) for bk in (128, 256)]
    variants += [{"num_stages": 3}, {"num_stages": 6}]
    if split:
        variants += [{"splits": base.splits * 2}, {"splits": max(1, base.splits // 2)}]
    out: list[GemmConfig] = []
    for v in variants:
        cfg = gemm_config(M, N, K, sms, allow_split=split, **v)
        if cfg not in out:
            out.append(cfg)
    return out


def graph_us(fns: list) -> float:
    """Median µs per call of fns (one call each) replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return do_bench(graph.replay, warmup=20, rep=100, return_mode="median") * 1e3 / len(fns)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double().sum(0) if y.dim() == 3 else y.double()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def bench_shape(name: str, M: int, N: int, K: int, split: bool, sms: int) -> list[dict]:
    torch.manual_seed(0)
    xq, xs = quantize_rows_reference(torch.randn(M, K, device="cuda"))
    wq, ws = quantize_weight_fp8(torch.randn(N, K, device="cuda") * 0.02)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t()
    copies = max(2, min(64, math.ceil(STREAM_BYTES / (N * K))))
    wqs = [wq] + [wq.clone() for _ in range(copies - 1)]
    head = {"shape": name, "M": M, "N": N, "K": K, "weight_MB": N * K / 1e6}
    rows = []

    def add(impl: str, fn, w_bytes: int, cfg: GemmConfig | None = None) -> None:
        row = {**head, "impl": impl, "config": None if cfg is None else vars(cfg)}
        try:
            row["max_rel_err"] = rel_err(fn(wq), ref)
            row["us"] = graph_us([lambda w=w: fn(w) for w in wqs])
            row["GB/s"] = w_bytes / row["us"] / 1e3
            if cfg is not None:
                row["partials_MB"] = cfg.splits * M * N * 4 / 1e6 if cfg.splits > 1 else 0.0
        except Exception as e:   # a configuration that fails is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(fmt_row(row), flush=True)

    for i, cfg in enumerate(sweep(M, N, K, sms, split)):
        head["default"] = i == 0
        kw = {k: getattr(cfg, k) for k in ("block_m", "block_n", "block_k", "splits", "num_warps", "num_stages")}
        add("triton", lambda w, kw=kw: fp8_gemm(xq, xs, w, ws, torch.bfloat16, partials=split, **kw), N * K, cfg)
    head["default"] = False
    scale_b = ws.view(1, N)
    add("_scaled_mm", lambda w: torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scale_b, out_dtype=torch.bfloat16),
        N * K)
    xb = (xq.float() * xs).bfloat16()
    wbs = [(w.float() * ws[:, None]).bfloat16() for w in wqs[:max(2, copies // 2)]]   # same bytes streamed
    row = {**head, "impl": "bf16 cuBLAS"}
    try:
        ref_b = xb.double() @ wbs[0].double().t()
        row["max_rel_err"] = rel_err(F.linear(xb, wbs[0]), ref_b)
        row["us"] = graph_us([lambda w=w: F.linear(xb, w) for w in wbs])
        row["GB/s"] = 2 * N * K / row["us"] / 1e3
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    print(fmt_row(row), flush=True)
    return rows


def fmt_row(r: dict) -> str:
    c = r.get("config")
    cfg = (f"BM{c['block_m']:<3d} BN{c['block_n']:<3d} BK{c['block_k']:<3d} S{c['splits']:<2d} "
           f"w{c['num_warps']} st{c['num_stages']}") if c else ""
    lead = f"{r['shape']:8s} M={r['M']:<3d} {r['impl']:11s} {cfg:32s}{'*' if r.get('default') else ' '}"
    if "error" in r:
        return f"{lead} FAILED {r['error']}"
    extra = f"  partials {r['partials_MB']:.1f} MB" if r.get("partials_MB") else ""
    bad = "  WRONG" if r["max_rel_err"] > 1e-2 else ""   # bf16 output rounding alone stays below ~4e-3
    return f"{lead} {r['us']:8.1f} µs {r['GB/s']:7.0f} GB/s  err {r['max_rel_err']:.1e}{extra}{bad}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("needs a Hopper GPU (fp8 wgmma)")
    sms = sm_count(torch.device("cuda", torch.cuda.current_device()))
    rows = []
    for M in args.m:
        for name, (N, K, split) in shapes().items():
            rows += bench_shape(name, M, N, K, split, sms)
    print("\nbest per shape (µs):")
    for M in args.m:
        for name in shapes():
            ok = [r for r in rows if r["shape"] == name and r["M"] == M and "us" in r]
            best = min((r for r in ok if r["impl"] == "triton"), key=lambda r: r["us"], default=None)
            other = {r["impl"]: r["us"] for r in ok if r["impl"] != "triton"}
            if best:
                print(f"{fmt_row(best)}  | " + "  ".join(f"{k} {v:.1f}" for k, v in other.items()))
    card = torch.cuda.get_device_name()
    out = Path(args.out) / f"fp8-gemm-{card.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"card": card, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
