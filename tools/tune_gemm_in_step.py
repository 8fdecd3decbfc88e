"""Tune the fp8 GEMM launches inside the graphed 1.3B decode step, where the kernels around each GEMM share the
card with it (gdn2q.kernels.fp8_gemm.STEP_TUNED holds what this measured).

Builds the 1.3B-shaped GDN-2 with random weights (as ``gdn2q bench`` does) on the kernel path with fp8 weights
and an int8 state at --batch, captures one decode step of all layers in a CUDA graph with PDL on, and times it
(median of 5 runs of 200 replays) with: gemm_config's rule for every projection, then one projection's launch
changed at a time (block_n, pipeline stages, K splits for o_proj and down, whose partials the next norm sums),
then the STEP_TUNED table as it stands. A variant that fails to compile or launch is a failed row. GPU only.
With --glue it sweeps the warps of the one-row-per-program glue kernels instead (gdn2q.kernels.glue.GLUE_WARPS,
which both recipes use). Writes gemm-in-step-<card>.json (glue-in-step-<card>.json) to --out.
Usage: python tools/tune_gemm_in_step.py [--batch 64] [--glue] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2q.kernels import fp8_gemm, glue, pdl  # noqa: E402
from gdn2q.kernels.bench import CONFIG_1B3, KernelLM, _timed, capture_graph, random_model  # noqa: E402
from gdn2q.quant.state import StateQuantConfig  # noqa: E402

c = CONFIG_1B3
SHAPES = {   # the fused projections of KernelLM: (N, K)
    "in_proj": (3 * c.key_dim + 2 * c.value_dim + 2 * c.head_v_dim, c.hidden_size),
    "o_proj": (c.hidden_size, c.value_dim),
    "gate_up": (2 * c.intermediate_size, c.hidden_size),
    "down": (c.hidden_size, c.intermediate_size),
}
WIDE = [{"block_n": 32}, {"block_n": 128}, {"num_stages": 4}, {"num_stages": 6}, {"block_k": 256, "num_stages": 3}]
SPLIT = [{"splits": 2}, {"splits": 3}, {"splits": 8}, {"block_n": 32, "splits": 2}, {"block_n": 128, "splits": 8},
         {"num_stages": 4}]
VARIANTS = {"in_proj": WIDE, "gate_up": WIDE, "o_proj": SPLIT, "down": SPLIT}
GLUE = {"add_rms_norm": (2, 4, 16), "gated_norm": (1, 2, 8, 16), "swiglu": (4, 8)}   # the rule: 8, 4, 16


def step_ms(lm: KernelLM, tok: torch.Tensor) -> float:
    graph = capture_graph(lambda: lm.decode(tok))
    return statistics.median(_timed(graph.replay, 200) * 1e3 for _ in range(5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--glue", action="store_true", help="sweep the glue kernels' warps instead of the GEMMs")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_gemm_in_step.py needs a CUDA GPU")
    model = random_model(CONFIG_1B3).to("cuda").to_dtype(torch.bfloat16).eval()
    tok = torch.randint(0, c.vocab_size, (args.batch,), device="cuda")
    card = torch.cuda.get_device_name()
    module, name = (glue, "GLUE_WARPS") if args.glue else (fp8_gemm, "STEP_TUNED")
    table = dict(getattr(module, name))
    rows = []

    def run(variant: str, entries: dict) -> None:
        setattr(module, name, {card: entries})
        row = {"variant": variant, "launch": {k if isinstance(k, str) else f"{k[0]}x{k[1]}": v
                                              for k, v in entries.items()}}
        try:
            row["ms"] = round(step_ms(lm, tok), 4)
        except Exception as e:  # a launch this card cannot compile or run is a row too
            row["error"] = repr(e)[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)

    with pdl.setting(True):
        lm = KernelLM(model, args.batch, StateQuantConfig("int8"), "fp8")
        run("rule", {})
        if args.glue:
            for kernel, warps in GLUE.items():
                for w in warps:
                    run(kernel, {kernel: w})
        else:
            for shape, variants in VARIANTS.items():
                for var in variants:
                    run(shape, {SHAPES[shape]: var})
        run(name, table.get(card, {}))
        run("rule", {})
    setattr(module, name, table)
    out = Path(args.out) / f"{'glue' if args.glue else 'gemm'}-in-step-{card.replace(' ', '-')}.json"
    meta = {"card": card, "batch": args.batch, "recipe": "fp8", "state": "int8", "pdl": True,
            "torch": torch.__version__, "triton": triton.__version__}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
