"""Compile a Triton kernel for sm_90 on a machine without a GPU and report registers, spills and SASS mix.

Costs no device time: Triton's bundled ptxas/nvdisasm/cuobjdump do the work. Use it before a GPU run to see
whether a change cut the per-element instruction count or pushed the kernel into local memory (STL/LDL).

    python tools/sass_report.py gdn2q.kernels.decode:_decode_kernel \
        --sig '{"q_ptr": "*bf16", ...}' --const '{"K": 128, ...}' --warps 4 \
        [--div16 N K] [--sass out.sass] [--ptx out.ptx]

``--div16`` names the integer arguments a launch passes as multiples of 16: Triton's launcher specializes those
(as it marks 16-byte aligned pointers), and address arithmetic on them decides whether loads vectorize.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                 num_stages: int = 3, div16: tuple[str, ...] = (), maxnreg: int | None = None):
    """Compiled kernel for sm_90 (pointer arguments marked 16-byte aligned, as the launches pass them, and the
    integer arguments named in div16 marked multiples of 16)."""
    names = list(fn.arg_names)
    sig = {n: (signature[n] if n in signature else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in div16}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():   # a @gluon.jit kernel: same compile, Gluon front end
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})


def report(kernel) -> tuple[dict[str, int], collections.Counter, str]:
    """(resource usage, opcode histogram, SASS text) of a compiled kernel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return usage, ops, sass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", help="module:function of a @triton.jit or @gluon.jit kernel")
    p.add_argument("--sig", required=True, help="JSON {arg: triton type} for the runtime arguments")
    p.add_argument("--const", default="{}", help="JSON {arg: value} for the constexpr arguments")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--maxnreg", type=int, help="register cap per thread (the launch option of that name)")
    p.add_argument("--div16", nargs="*", default=[], help="integer arguments the launch passes as multiples of 16")
    p.add_argument("--per", type=int, default=0, help="divide instruction counts by this (elements per thread)")
    p.add_argument("--sass", help="also write the SASS text here")
    p.add_argument("--ptx", help="also write the PTX here")
    a = p.parse_args()
    mod, name = a.kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    kernel = compile_sm90(fn, json.loads(a.sig), json.loads(a.const), a.warps, a.stages, tuple(a.div16), a.maxnreg)
    usage, ops, sass = report(kernel)
    total = sum(ops.values())
    print("resources:", usage, "instructions:", total, f"per element: {total / a.per:.1f}" if a.per else "")
    print(" ".join(f"{k}:{v}" for k, v in ops.most_common(30)))
    if a.sass:
        with open(a.sass, "w") as f:
            f.write(sass)
    if a.ptx:
        with open(a.ptx, "w") as f:
            f.write(kernel.asm["ptx"])


if __name__ == "__main__":
    main()
