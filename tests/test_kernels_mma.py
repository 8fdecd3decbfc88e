"""The tensor-core pass-1 reads of the int8/fp8 decode kernel (gdn2q.kernels.mma_read) against the reference.

Under the CPU interpreter the PTX block is replaced by a twin that computes each accumulator element from its
definition, so these tests cover the weight digits, the index maps, the scaling of the reads and their hand-off
to pass 2; the lane layout and the PTX itself are checked on the GPU (tools/gpu_check_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from gdn2q.kernels import decode_step
from gdn2q.kernels.decode import decode_triton, launch_params, mma_applies
from gdn2q.quant.state import QMAX, StateQuantConfig
from tests.pools import pool_pair

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HV, K, V, P = 3, 1, 2, 64, 128, 5       # the reads need V = 128 and K a multiple of 32
SLOTS = [3, -1, 0]
MMA = {"num_warps": 1, "block_k": 8, "mma": 1, "programs_per_sm": 1}


@pytest.mark.parametrize("fmt", [
    StateQuantConfig("int8"), StateQuantConfig("fp8"),
    StateQuantConfig("int8", rounding="error-feedback", granularity="head"),
    StateQuantConfig("fp8", scales="static")], ids=lambda f: "-".join(f.to_dict().values()))
def test_tensor_core_reads_match_reference(fmt: StateQuantConfig):
    gen = torch.Generator().manual_seed(5)
    pk, pr = pool_pair(fmt, gen, P, HV, K, V, DEV)

    def r(*s):
        return torch.randn(B, *s, generator=gen).to(DEV)

    q, k, v = r(HQ, K), r(HQ, K), r(HV, V)
    g = -torch.rand(B, HQ, K, generator=gen).to(DEV)
    b, w = torch.rand(B, HQ, K, generator=gen).to(DEV), torch.rand(B, HV, V, generator=gen).to(DEV)
    static = (torch.rand(HV, K, generator=gen) * 0.05 + 0.01).to(DEV) if fmt.scales == "static" else None
    slots = torch.tensor(SLOTS, device=DEV)
    assert mma_applies(launch_params(fmt, B * HV, 4, **MMA), K, V)
    out = torch.full((B, HV, V), float("nan"), device=DEV)
    decode_triton(q, k, v, g, b, w, pk, slots, fmt, out=out, static_scales=static, **MMA)
    ref = decode_step(q, k, v, g, b, w, pr, slots, fmt, static_scales=static, force="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(out[1] == 0)
    steps = (pk.dequantize() - pr.dequantize()).abs() / pr.scales.unsqueeze(-1)
    assert steps[[3, 0]].max() <= 1.01                                   # within one step of the grid
    assert torch.equal(pk.codes[[1, 2, 4]], pr.codes[[1, 2, 4]])        # untouched slots
    assert torch.allclose(pk.scales, pr.scales, rtol=2 / QMAX[fmt.dtype], atol=1e-30)


def test_tensor_core_reads_only_where_they_fit():
    """Other shapes keep the FMA pass; asking for the reads with several warps per tile is an error."""
    fmt = StateQuantConfig("int8")
    assert not mma_applies(launch_params(fmt, 6, 4, **MMA), 32, 32)
    assert not mma_applies(launch_params(fmt, 6, 4, **MMA), 48, 128)
    with pytest.raises(ValueError, match="num_warps=1"):
        mma_applies(launch_params(fmt, 6, 4, mma=1, num_warps=4), 64, 128)
