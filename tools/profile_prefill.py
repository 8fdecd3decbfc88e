"""Device time per kernel of one prefill call, gdn2q's chunked prefill against fla's ``chunk_gdn2``.

Same process, same inputs (as tools/bench_kernels.py builds them).

Device time only (torch.profiler's CUDA activity), so host launch gaps do not count: this is the measure on
which gdn2q's prefill trails fla (docs/kernels.md), and the table says which kernels to work on.
``--variant`` (repeatable) adds gdn2q runs with ``prefill_triton`` launch options, e.g.
``--variant '{"score_block_k": 32}'``, to compare kernel by kernel. Writes profile-prefill-<card>.json to --out.
Usage: python tools/profile_prefill.py [--shapes 1x8192 1x32768] [--variant JSON ...] [--calls 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import STATES, H, K, V, _prefill_call, _prefill_inputs  # noqa: E402


def kernel_times(fn, calls: int) -> tuple[float, list[dict]]:
    """(device µs per call, [{kernel, us per call, launches per call}] by time) of fn, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:110]][0] += ev.device_time / calls
            per[ev.name[:110]][1] += 1 / calls
    rows = sorted(({"kernel": k, "us": v[0], "launches": round(v[1], 2)} for k, v in per.items()),
                  key=lambda r: -r["us"])
    return sum(r["us"] for r in rows), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1x8192", "1x32768"], help="BxT prefill shapes")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], type=json.loads,
                    help="JSON of prefill_triton launch options for an extra gdn2q run (repeatable)")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args()
    try:
        from fla.ops.gdn2 import chunk_gdn2
    except ImportError:
        chunk_gdn2 = None
    runs = []
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        inputs = _prefill_inputs(B, T)
        sides = [("gdn2q int8", _prefill_call(inputs, STATES["int8"]))]
        sides += [(f"gdn2q int8 {json.dumps(v)}", _prefill_call(inputs, STATES["int8"], **v)) for v in args.variant]
        if chunk_gdn2 is not None:
            h0 = torch.randn(B, H, K, V, device="cuda")
            sides.append(("fla fp32", partial(chunk_gdn2, *inputs, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)))
        for name, fn in sides:
            total, rows = kernel_times(fn, args.calls)
            runs.append({"B": B, "T": T, "impl": name, "device_us": total, "kernels": rows})
            print(f"{shape} {name}: {total:.1f} µs of device time per call")
            for r in rows[:12]:
                print(f"  {r['us']:8.1f} µs  x{r['launches']:<5} {r['kernel']}")
    card = torch.cuda.get_device_name()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"profile-prefill-{card.replace(' ', '-')}.json").write_text(json.dumps(
        {"card": card, "torch": torch.__version__, "triton": triton.__version__, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
