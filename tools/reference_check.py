"""How closely the reference model reproduces the trained fixtures (the foundation's acceptance figures).

Writes docs/benchmarks/reference-fixtures.{json,md}: fp32 vs the float64 oracle, fp32 and bf16 top-1 agreement
with fla's bf16 kernels, chunked vs token-serial logits, and prefill + 64 one-token steps vs one full forward.

    python tools/reference_check.py [--shared ../shared] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import gdn2q

FIXTURES = ("tiny", "tiny-hybrid", "small")


def logits(model, ids, mode="auto"):
    model.set_recurrence(mode)
    with torch.no_grad():
        return model(ids).float()


def check(folder: Path) -> dict:
    ref = load_file(str(folder / "reference.safetensors"))
    ids, oracle, fla = ref["input_ids"], ref["logits_oracle_fp64"], ref["logits_fla_bf16"]
    fp32 = gdn2q.load_model(folder)
    bf16 = gdn2q.load_model(folder, dtype=torch.bfloat16)
    serial, chunk = logits(fp32, ids, "serial"), logits(fp32, ids, "chunk")
    fp32.set_recurrence("auto")
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, fp32.config.vocab_size, (2, 100 + 64), generator=gen)
    with torch.no_grad():
        full = fp32(stream)
        state = fp32.new_state(2)
        steps = [fp32(stream[:, :100], state)] + [fp32(stream[:, t:t + 1], state) for t in range(100, 164)]
    top1 = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()  # noqa: E731
    return {
        "fp32_vs_oracle_max_abs": (serial - oracle).abs().max().item(),
        "fp32_vs_fla_bf16_top1": top1(serial, fla),
        "fp32_vs_fla_bf16_max_abs": (serial - fla).abs().max().item(),
        "bf16_vs_fla_bf16_top1": top1(logits(bf16, ids), fla),
        "chunk_vs_serial_max_abs": (chunk - serial).abs().max().item(),
        "prefill100_plus_64_steps_vs_full_max_abs": (torch.cat(steps, 1) - full).abs().max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    rows = {name: check(args.shared / "checkpoints" / name) for name in FIXTURES}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference-fixtures.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = list(next(iter(rows.values())))
    md = ["# Reference model vs the trained fixtures", "", "Written by `python tools/reference_check.py`.", "",
          "| fixture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {n} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |" for n, r in rows.items()]
    (args.out / "reference-fixtures.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
