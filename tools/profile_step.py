"""Where the time of one graphed decode step of KernelLM goes: GPU time per kernel, summed over a step.

Builds the 1.3B-shaped GDN-2 with random weights (as ``gdn2q bench`` does), captures one decode step of all
layers in a CUDA graph, profiles a few replays with torch.profiler and prints the kernels by GPU time per
step, for each (recipe, state) asked, with programmatic dependent launch (gdn2q.kernels.pdl) off and/or on.
Under PDL a kernel starts while its predecessor runs and its profiled time includes that overlap (and the wait),
so per-kernel sums exceed the step then; compare step_us. Writes profile-step-<card>.json to --out.
Usage: python tools/profile_step.py [--batch 64] [--runs fp8:int8 bf16:fp32] [--pdl on|off|both] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2q.kernels import pdl  # noqa: E402
from gdn2q.kernels.bench import CONFIG_1B3, PDL_MODES, KernelLM, capture_graph, random_model  # noqa: E402
from gdn2q.model.lm import GDN2ForCausalLM  # noqa: E402
from gdn2q.quant.state import StateQuantConfig  # noqa: E402


def profile_step(model: GDN2ForCausalLM, batch: int, recipe: str, state: str, use_pdl: bool,
                 replays: int = 5) -> dict:
    """GPU µs per decode step by kernel name (and the step's wall time) for one recipe, state format and PDL
    setting (applied while the step is captured)."""
    lm = KernelLM(model, batch, StateQuantConfig(state), recipe)
    tok = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")
    with pdl.setting(use_pdl):
        graph = capture_graph(lambda: lm.decode(tok))
        used = pdl.active(tok.device)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    step_us = start.elapsed_time(end) * 1e3 / 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc = per_kernel[ev.name[:110]]
            acc[0] += ev.device_time / replays
            acc[1] += 1 / replays
    kernels = sorted(({"kernel": n, "us": t, "launches": round(c)} for n, (t, c) in per_kernel.items()),
                     key=lambda r: -r["us"])
    return {"recipe": recipe, "state": state, "batch": batch, "pdl": used, "step_us": step_us,
            "kernel_us": sum(r["us"] for r in kernels), "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", nargs="+", default=["fp8:int8", "bf16:fp32"], help="recipe:state pairs")
    ap.add_argument("--pdl", choices=PDL_MODES, default="both", help="programmatic dependent launch off, on or both")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args()
    model = random_model(CONFIG_1B3).to("cuda").to_dtype(torch.bfloat16).eval()
    results = []
    for run in args.runs:
        recipe, state = run.split(":")
        for use_pdl in PDL_MODES[args.pdl]:
            r = profile_step(model, args.batch, recipe, state, use_pdl)
            results.append(r)
            print(f"\n== {recipe} weights + {state} state, B={args.batch}, PDL {r['pdl']}: step {r['step_us']:.0f} "
                  f"µs, kernels {r['kernel_us']:.0f} µs")
            for k in r["kernels"][:25]:
                print(f"{k['us']:9.1f} µs {k['launches']:4d}x  {k['kernel']}")
    print("\nstep µs: " + ", ".join(f"{r['recipe']}:{r['state']} PDL {r['pdl']} {r['step_us']:.0f}" for r in results))
    card = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"profile-step-{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "pdl_supported": pdl.SUPPORTED}
    out.write_text(json.dumps({**meta, "runs": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
