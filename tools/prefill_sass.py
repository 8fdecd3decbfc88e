"""Registers, spills and SASS mix of the five prefill kernels at the deployed shape, compiled for sm_90 on the CPU.

Uses tools/sass_report.py (Triton's bundled ptxas/nvdisasm; no device time), with the arguments
gdn2q.kernels.prefill.prefill_triton passes at H=16, K=V=128, bf16 inputs, an int8 row-scaled pool and its
default launch options for ``--sequences`` sequences (the sequential pass's value block and stages depend on it).
``SHARED`` is the shared memory a launch asks for (227 KiB per block on sm_90), ``HGMMA`` counts tensor-core
instructions, ``STL``/``LDL`` local-memory spill traffic.
Usage: python tools/prefill_sass.py [--dot bf16 mixed ...] [--sequences 1]
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sass_report import compile_sm90, report  # noqa: E402

from gdn2q.kernels import prefill  # noqa: E402
from gdn2q.kernels.state_io import format_constexprs  # noqa: E402
from gdn2q.quant.state import StateQuantConfig  # noqa: E402

H, K, V = 16, 128, 128
SHOWN = ("HGMMA", "HMMA", "STL", "LDL", "LDG", "STG", "LDS", "STS", "FFMA", "MUFU", "BAR")


def kernels(dot: str, sequences: int = 1) -> list[tuple[str, object, dict, dict, int, int]]:
    """(name, kernel, signature, constexprs, warps, stages) of each launch of prefill_triton for ``dot``."""
    plan = prefill.launch_plan(dot)
    t = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    op, y, kt, u = t[plan.out_dtype], t[plan.y_dtype], t[plan.kt_dtype], t[plan.u_dtype]
    cx = format_constexprs(StateQuantConfig("int8"))
    ins = {"q_ptr": "*bf16", "k_ptr": "*bf16", "g_ptr": "*fp32", "b_ptr": "*bf16"}
    score = {**ins, "aqk_ptr": op, "ainv_ptr": "*fp32", "norms_ptr": "*fp32", "qg_ptr": op, "T": "i32", "Tp": "i32",
             "scale": "fp32"}
    wyk = {"k_ptr": "*bf16", "g_ptr": "*fp32", "b_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*bf16",
           "ainv_ptr": "*fp32", "norms_ptr": "*fp32", "y_ptr": y, "ylo_ptr": y, "u_ptr": u, "kt_ptr": kt,
           "ktlo_ptr": kt, "gc_ptr": "*fp32", "T": "i32", "Tp": "i32"}
    state = {"y_ptr": y, "ylo_ptr": y, "u_ptr": u, "kt_ptr": kt, "ktlo_ptr": kt, "gc_ptr": "*fp32", "hs_ptr": op,
             "vn_ptr": op, "fin_ptr": "*fp32", "codes_ptr": "*i8", "scales_ptr": "*fp32", "slots_ptr": "*i32",
             "N": "i32"}
    out = {"aqk_ptr": op, "qg_ptr": op, "norms_ptr": "*fp32", "hs_ptr": op, "vn_ptr": op, "o_ptr": "*bf16",
           "T": "i32", "N": "i32"}
    store = {"fin_ptr": "*fp32", "codes_ptr": "*i8", "scales_ptr": "*fp32", "res_ptr": "*i8",
             "static_ptr": "*fp32", "slots_ptr": "*i32", "seed_ptr": "*i64"}
    heads = {"HQ": H, "HV": H, "K": K, "V": V}
    # the launch options as prefill_triton defaults them, so this report follows any retuning
    d = {n: p.default for n, p in inspect.signature(prefill.prefill_triton).parameters.items()}
    bv = prefill.state_block_v(sequences * H, V, 132)
    return [
        ("score", prefill._score_kernel, score, {"HQ": H, "K": K, "L2NORM": True, "DOT": plan.score,
                                                 "KS": min(K, d["score_block_k"])}, 4, 3),
        ("wy", prefill._wy_kernel, wyk, {**heads, "DOT": plan.wy, "SPLIT_Y": plan.y_split, "SPLIT_KT": plan.kt_split,
                                         "KC": min(K, d["wy_block_k"] or plan.wy_block_k)}, d["intra_warps"], 3),
        ("state", prefill._state_kernel, state, {**heads, "BV": bv, "INIT": True, "MODE": cx["MODE"],
                                                 "ROW": cx["ROW"], "READ": plan.read, "WRITE": plan.write},
         d["state_warps"], prefill.state_stages(plan, K, bv)),
        ("output", prefill._output_kernel, out, {**heads, "BV": d["out_block_v"], "DOT": plan.out}, 4, 3),
        ("store", prefill._store_kernel, store, {"HV": H, "K": K, "V": V, "INIT": True, **cx}, 4, 3),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dot", nargs="*", default=["bf16", "mixed"], choices=prefill.DOT_PRECISIONS)
    ap.add_argument("--sequences", type=int, default=1, help="batch size B of the launch (H=16 heads each)")
    a = ap.parse_args()
    print("| dot | kernel | REG | STACK | SHARED | instructions | " + " | ".join(SHOWN) + " |")
    print("|---" * (6 + len(SHOWN)) + "|")
    for dot in a.dot:
        for name, fn, sig, const, warps, stages in kernels(dot, a.sequences):
            compiled = compile_sm90(fn, sig, const, warps, stages)
            usage, ops, _ = report(compiled)
            cells = [str(usage.get(x, 0)) for x in ("REG", "STACK")] + [str(compiled.metadata.shared),
                                                                        str(sum(ops.values()))]
            print(f"| {dot} | {name} | " + " | ".join(cells + [str(ops.get(x, 0)) for x in SHOWN]) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
