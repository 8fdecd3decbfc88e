"""The Gluon decode kernel (gdn2q/kernels/decode_staged.py): its dispatch policy, its CPU fallback, and its sm_90
build.

Gluon has no CPU interpreter, so its numerics are checked on the GPU (tools/gpu_check_kernels.py: the B=256
rows run it by default). Here: which launches pick it, that the interpreter runs the Triton kernel in its
place (matching the reference), and that it compiles for sm_90 with Triton's bundled ptxas within the
register budget its launch table assumes, copying the tile into shared memory asynchronously.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdn2q.kernels import decode_step
from gdn2q.kernels.decode import LAUNCH, decode_triton, launch_params
from gdn2q.quant.state import StateQuantConfig
from tests.pools import pool_pair

SMS = 132
FEW, MEDIUM, MANY = 8 * 16, 64 * 16, 256 * 16    # (sequence, value head) tiles at B=8, 64 and 256, H=16


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_staged_kernel_is_picked_for_few_and_many_tiles_of_a_covered_format(dtype: str):
    assert launch_params(StateQuantConfig(dtype), MANY, SMS)["staged"] == 1
    assert launch_params(StateQuantConfig(dtype), FEW, SMS)["staged"] == 1
    assert launch_params(StateQuantConfig(dtype), MEDIUM, SMS)["staged"] == 0
    assert launch_params(StateQuantConfig(dtype), MANY, SMS, staged=0) == {**LAUNCH[("8bit", "many")], "staged": 0}
    assert launch_params(StateQuantConfig(dtype), MEDIUM, SMS, staged=1)["num_warps"] == 4


@pytest.mark.parametrize("fmt", [StateQuantConfig("int8", rounding="stochastic"),
                                 StateQuantConfig("fp8", rounding="error-feedback"),
                                 StateQuantConfig("int8", granularity="head"),
                                 StateQuantConfig("int8", scales="static"), StateQuantConfig("bf16")])
def test_other_formats_keep_the_triton_kernels(fmt: StateQuantConfig):
    assert not launch_params(fmt, MANY, SMS)["staged"]
    with pytest.raises(ValueError, match="staged=1"):
        launch_params(fmt, MANY, SMS, staged=1)
    with pytest.raises(ValueError, match="staged=1"):     # the kernel's tile is 128 x 128
        launch_params(StateQuantConfig("int8"), MANY, SMS, K=64, V=64, staged=1)


def test_interpreter_runs_the_triton_kernel_where_the_staged_one_is_picked():
    """A launch that picks the Gluon kernel still runs (and matches the reference) under the CPU interpreter."""
    fmt, B, H, K = StateQuantConfig("int8"), 2, 2, 128
    gen = torch.Generator().manual_seed(3)
    assert launch_params(fmt, B * H, 4, staged=1)["staged"] == 1
    pk, pr = pool_pair(fmt, gen, B + 1, H, K, K, "cpu")
    slots = torch.tensor([2, 0])
    q, k, v = (torch.randn(B, H, K, generator=gen) for _ in range(3))
    g = -torch.rand(B, H, K, generator=gen)
    b, w = torch.rand(B, H, K, generator=gen), torch.rand(B, H, K, generator=gen)
    o = decode_triton(q, k, v, g, b, w, pk, slots, fmt, staged=1)
    ref = decode_step(q, k, v, g, b, w, pr, slots, fmt, force="torch")
    torch.testing.assert_close(o, ref, rtol=1e-3, atol=1e-3)
    step = pr.scales[slots].unsqueeze(-1)
    assert ((pk.dequantize()[slots] - pr.dequantize()[slots]).abs() / step).max() <= 1.0001


SIG = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "g_ptr": "*fp32", "b_ptr": "*fp32", "w_ptr": "*bf16",
       "alog_ptr": "*fp32", "dtb_ptr": "*fp32", "o_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*fp32",
       "slots_ptr": "*i32", "scale": "fp32", "n_tiles": "i32", "z_ptr": "*bf16", "zb_ptr": "*bf16",
       "nw_ptr": "*bf16", "os_ptr": "*fp32", "z_stride": "i32", "eps": "fp32"}
# in a fresh process: with TRITON_INTERPRET=1 (this test session) Triton wraps every jit function for its
# interpreter, which a real build cannot call
BUILD = """
import json, sys
sys.path.insert(0, "tools")
from sass_report import compile_sm90, report
from gdn2q.kernels.decode_staged import _decode8_staged_kernel
sig, const = json.loads(sys.argv[1]), json.loads(sys.argv[2])
usage, ops, _ = report(compile_sm90(_decode8_staged_kernel, sig, const, num_warps=4, div16=("z_stride",),
                                    maxnreg=int(sys.argv[3])))
print(json.dumps({"usage": usage, "ops": ops}))
"""


@pytest.mark.parametrize("mode,out_norm", [(2, False), (3, True)])
def test_staged_kernel_builds_for_sm90_within_its_register_budget(mode: int, out_norm: bool):
    """The tile arrives through asynchronous copies (LDGSTS) into shared memory and both passes read it there
    (LDS), pass 1 on the tensor cores (int8 IMMA, fp8 through f16 HMMA); four 4-warp programs per
    multiprocessor (LAUNCH) fit 128 registers a thread, the launch's cap, with at most a few words spilled
    (register use differs between Triton versions: none spill with 3.6)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    launch = LAUNCH[("8bit-staged", "many")]
    const = dict(HQ=16, HV=16, K=128, V=128, FUSED=False, NEG_EIG=False, L2NORM=True, MODE=mode, OUT_NORM=out_norm,
                 ZBIAS=False, SIGMOID=True, TRIGGER=out_norm, UNROLL=launch["unroll"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", BUILD, json.dumps(SIG), json.dumps(const), str(launch["maxnreg"])],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    usage, ops = built["usage"], built["ops"]
    assert launch["num_warps"] * 32 * launch["maxnreg"] * launch["programs_per_sm"] <= 65536
    assert usage["REG"] <= launch["maxnreg"] and usage.get("STACK", 0) <= 64, usage
    assert ops.get("LDGSTS", 0) > 0 and ops.get("LDS", 0) > 0, ops
    assert ops.get("IMMA" if mode == 2 else "HMMA", 0) >= 32, ops   # 16 steps x 2 (int8), 32 steps (fp8)
