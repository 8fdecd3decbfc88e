"""gdn2q.kernels against the PyTorch reference (gdn2q.ops + gdn2q.quant.state).

Without CUDA the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1) at small shapes with fp32
operands. The interpreter rounds fp32 -> bf16 by truncation and some fp32 -> fp8 casts differently from
the GPU, so those stored states are compared within one step of their grid. Full shapes run on the GPU
through tools/gpu_check_kernels.py.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import pytest
import torch

from gdn2q.kernels import (
    Fp8Linear,
    backend,
    chunk_prefill,
    decode_step,
    fp8_linear,
    new_state_pool,
    quantize_weight_fp8,
)
from gdn2q.kernels.reference import gates  # noqa: E402
from gdn2q.ops.naive import gdn2_step, prepare_qk  # noqa: E402
from gdn2q.quant.state import QMAX, StateQuantConfig  # noqa: E402
from tests.pools import pool_pair

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HV, K, V, P = 3, 1, 2, 32, 32, 5
SLOTS = [3, -1, 0]                       # slot -1 is padding; slots 1, 2, 4 must stay untouched


def _fill_pool(fmt: StateQuantConfig, gen: torch.Generator):
    return pool_pair(fmt, gen, P, HV, K, V, DEV)


def _step_inputs(gen: torch.Generator, T: int | None = None):
    lead = (B,) if T is None else (B, T)

    def r(*s):
        return torch.randn(*lead, *s, generator=gen).to(DEV)

    q, k, v = r(HQ, K), r(HQ, K), r(HV, V)
    g = -torch.rand(*lead, HQ, K, generator=gen).to(DEV)
    b, w = torch.rand(*lead, HQ, K, generator=gen).to(DEV), torch.rand(*lead, HV, V, generator=gen).to(DEV)
    return q, k, v, g, b, w


def _assert_states_close(kern, ref, fmt: StateQuantConfig, slots: list[int], fp32_rel: float = 1e-5):
    """Stored states agree within one step of the storage grid; untouched slots are bit-identical."""
    dk, dr = kern.dequantize().cpu(), ref.dequantize().cpu()
    if fmt.quantized:
        sc = ref.scales.cpu().unsqueeze(-1)
        tol = sc * 1.01 if fmt.dtype == "int8" else dr.abs() / 8 + sc * 2.0 ** -9
        assert torch.allclose(kern.scales.cpu(), ref.scales.cpu(), rtol=2 / QMAX[fmt.dtype], atol=1e-30)
    elif fmt.dtype == "bf16":
        tol = dr.abs() / 64 + 1e-30                   # the interpreter truncates to bf16
    else:
        tol = fp32_rel * dr.abs().amax() + 1e-6
    touched = [s for s in slots if s >= 0]
    assert torch.all((dk - dr).abs()[touched] <= tol[touched] if torch.is_tensor(tol) and tol.dim() else
                     (dk - dr).abs()[touched] <= tol)
    untouched = [s for s in range(P) if s not in touched]
    for a, c in ((kern.codes, ref.codes), (kern.scales, ref.scales), (kern.residual, ref.residual)):
        if a is not None:
            assert torch.equal(a[untouched].cpu().float(), c[untouched].cpu().float())


FORMATS = [
    StateQuantConfig("fp32"),
    StateQuantConfig("bf16"),
    StateQuantConfig("int8"),
    StateQuantConfig("int8", rounding="error-feedback"),
    StateQuantConfig("int8", granularity="head"),
    StateQuantConfig("int8", scales="static"),
    StateQuantConfig("fp8"),
    StateQuantConfig("fp8", rounding="error-feedback", granularity="head"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f.to_dict().values()))
def test_decode_step_matches_reference(fmt: StateQuantConfig):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(fmt).encode()))
    pk, pr = _fill_pool(fmt, gen)
    static = (torch.rand(HV, K, generator=gen) * 0.05 + 0.01).to(DEV) if fmt.scales == "static" else None
    slots = torch.tensor(SLOTS, device=DEV)
    inputs = _step_inputs(gen)
    out = torch.full((B, HV, V), float("nan"), device=DEV)
    ok = decode_step(*inputs, pk, slots, fmt, static_scales=static, out=out, force="triton")
    ref = decode_step(*inputs, pr, slots, fmt, static_scales=static, force="torch")
    assert ok is out and not torch.isnan(out).any()
    torch.testing.assert_close(ok, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(ok[1] == 0)
    _assert_states_close(pk, pr, fmt, SLOTS)


@pytest.mark.parametrize("fmt,block_v,launch", [
    (StateQuantConfig("fp32"), 16, {}), (StateQuantConfig("int8"), None, {}),
    (StateQuantConfig("fp8", rounding="error-feedback"), None, {}),
    (StateQuantConfig("int8", granularity="head"), None, {"block_k": 4, "unroll": 2, "num_warps": 1}),
    (StateQuantConfig("fp8"), None, {"block_k": 8, "num_warps": 2, "unroll": 4}),
    (StateQuantConfig("int8", rounding="error-feedback"), None, {"block_k": 16, "num_warps": 1}),
    (StateQuantConfig("fp8", scales="static"), None, {"block_k": 8, "stages": 3}),
    (StateQuantConfig("bf16"), 16, {"num_warps": 1, "stages": 2})],
    ids=["fp32-split-v", "int8", "fp8-ef", "int8-head-bk4-unroll2", "fp8-bk8-unroll4", "int8-ef-bk16",
         "fp8-static-bk8", "bf16-split-v-pipelined"])
def test_decode_persistent_grid_walks_every_tile(fmt: StateQuantConfig, block_v: int | None, launch: dict):
    """One program per multiprocessor (4 under the interpreter) for 6 or 12 tiles: each program updates
    several tiles in turn, padding included, for any block of key rows and unrolling of the int8/fp8 passes."""
    from gdn2q.kernels.decode import decode_triton

    gen = torch.Generator().manual_seed(11)
    pk, pr = _fill_pool(fmt, gen)
    slots = torch.tensor(SLOTS, device=DEV)
    inputs = _step_inputs(gen)
    out = torch.full((B, HV, V), float("nan"), device=DEV)
    static = (torch.rand(HV, K, generator=gen) * 0.05 + 0.01).to(DEV) if fmt.scales == "static" else None
    decode_triton(*inputs, pk, slots, fmt, out=out, block_v=block_v, programs_per_sm=1, static_scales=static,
                  **launch)
    ref = decode_step(*inputs, pr, slots, fmt, force="torch", static_scales=static)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    _assert_states_close(pk, pr, fmt, SLOTS)


@pytest.mark.parametrize("neg", [False, True])
def test_decode_fused_gates(neg: bool):
    fmt = StateQuantConfig("int8")
    gen = torch.Generator().manual_seed(7 + neg)
    pk, pr = _fill_pool(fmt, gen)
    q, k, v, f, b_pre, w_pre = (t * 3 for t in _step_inputs(gen))
    A_log = torch.log(torch.rand(HQ, generator=gen) * 15 + 1).to(DEV)
    dt_bias = (torch.rand(HQ * K, generator=gen) * 4 - 6).to(DEV)
    slots = torch.tensor(SLOTS, device=DEV)
    ok = decode_step(q, k, v, f, b_pre, w_pre, pk, slots, fmt, A_log=A_log, dt_bias=dt_bias,
                     allow_neg_eigval=neg, force="triton")
    g, b, w = gates(f, b_pre, w_pre, A_log, dt_bias, neg)
    ref = decode_step(q, k, v, g, b, w, pr, slots, fmt, force="torch")
    torch.testing.assert_close(ok, ref, rtol=1e-4, atol=1e-5)
    _assert_states_close(pk, pr, fmt, SLOTS)


def _assert_fp8_rows_close(kern, ref):
    """e4m3 rows (codes, scales): scales equal to fp32 rounding, codes at most one e4m3 step apart."""
    (kc, ks), (rc, rs) = kern, ref
    assert kc.dtype == rc.dtype == torch.float8_e4m3fn and kc.shape == rc.shape and ks.shape == rs.shape
    torch.testing.assert_close(ks.cpu(), rs.cpu(), rtol=1e-5, atol=0)
    a, c = kc.cpu().float(), rc.cpu().float()
    big = torch.maximum(a.abs(), c.abs())
    step = torch.where(big >= 2 ** -6, torch.exp2(torch.floor(torch.log2(big.clamp_min(2 ** -6))) - 3), 2 ** -9)
    assert torch.all((a - c).abs() <= step)
    assert (a != c).float().mean() < 0.05   # rounding ties of slightly different fp32 sums only


@pytest.mark.parametrize("fmt,activation,bias,launch", [
    (StateQuantConfig("int8"), "sigmoid", False, {}),
    (StateQuantConfig("fp8"), "swish", True, {"block_k": 8}),
    (StateQuantConfig("int8", granularity="head"), "swish", False, {"programs_per_sm": 1}),
], ids=["int8-sigmoid", "fp8-swish-bias-bk8", "int8-head-persistent"])
def test_decode_output_norm_matches_reference(fmt: StateQuantConfig, activation: str, bias: bool, launch: dict):
    """The gated RMSNorm fused into the int8/fp8 decode kernel: e4m3 rows with one scale per (sequence, head)
    against the reference decode followed by the reference norm and block quantization; padding rows are 0."""
    from gdn2q.kernels import OutputNorm
    from gdn2q.kernels.decode import decode_triton

    gen = torch.Generator().manual_seed(21)
    pk, pr = _fill_pool(fmt, gen)
    slots = torch.tensor(SLOTS, device=DEV)
    inputs = _step_inputs(gen)
    z = (torch.randn(B, HV * V, generator=gen) * 2).to(DEV)
    norm = OutputNorm(z, (torch.randn(HV * V, generator=gen)).to(DEV) if bias else None,
                      (torch.rand(V, generator=gen) + 0.5).to(DEV), 1e-6, activation)
    got = decode_triton(*inputs, pk, slots, fmt, out_norm=norm, **launch)
    ref = decode_step(*inputs, pr, slots, fmt, out_norm=norm, force="torch")
    assert got[0].shape == (B, HV * V) and got[1].shape == (B, HV)
    _assert_fp8_rows_close(got, ref)
    assert torch.all(got[0][1].float() == 0)
    _assert_states_close(pk, pr, fmt, SLOTS)
    with pytest.raises(ValueError, match="out_norm"):
        decode_step(*inputs, pk, slots, StateQuantConfig("bf16"), out_norm=norm)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_decode_stochastic_rounding(dtype: str):
    """Codes bracket the exact value (within one grid step), differ between seeds, repeat for one seed."""
    fmt = StateQuantConfig(dtype, rounding="stochastic")
    gen = torch.Generator().manual_seed(3)
    pools = _fill_pool(fmt, gen) + _fill_pool(fmt, torch.Generator().manual_seed(3))
    slots = torch.tensor(SLOTS, device=DEV)
    inputs = _step_inputs(gen)
    prev = pools[0].index_select(torch.tensor([3, 0], device=DEV))
    for p, seed in zip(pools, (11, 12, 11, 11), strict=True):
        decode_step(*inputs, p, slots, fmt, seed=seed, force="triton")
    assert torch.equal(pools[0].codes.float(), pools[2].codes.float())
    assert not torch.equal(pools[0].codes.float(), pools[1].codes.float())
    q, k, v, g, b, w = (t[[0, 2]].repeat_interleave(HV // t.shape[1], 1) if t.shape[1] == HQ else t[[0, 2]]
                        for t in inputs)
    qf, kf = prepare_qk(q, k, None, True)
    _, s = gdn2_step(qf, kf, v, g, b, w, prev.dequantize())
    sc = pools[0].scales[[3, 0]]
    torch.testing.assert_close(sc, s.abs().amax(-1) / QMAX[dtype], rtol=1e-5, atol=0)
    y = s / sc.unsqueeze(-1)
    c = pools[0].codes[[3, 0]].float()
    step = 1.0 if dtype == "int8" else torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(2 ** -6))) - 3)
    assert torch.all((c - y).abs() <= step * 1.0001 + 1e-6)
    err = (c - y).mean().item()
    assert abs(err) < 0.05 * (1.0 if dtype == "int8" else y.abs().mean().item() / 8)


@pytest.mark.parametrize("fmt,initial", [(StateQuantConfig("fp32"), True),
                                         (StateQuantConfig("int8", rounding="error-feedback"), True),
                                         (StateQuantConfig("fp8", granularity="head"), False)],
                         ids=["fp32", "int8-ef", "fp8-head-fresh"])
def test_chunk_prefill_matches_reference(fmt: StateQuantConfig, initial: bool):
    gen = torch.Generator().manual_seed(5)
    pk, pr = _fill_pool(fmt, gen)
    T = 80                                                      # two chunks, the last one partial
    q, k, v, g, b, w = _step_inputs(gen, T)
    g[0, 5:20] = -40.0                                          # a decay that would overflow exp(-G)
    slots = torch.tensor([3, 1, 0], device=DEV)
    out = torch.full((B, T, HV, V), float("nan"), device=DEV)
    ok = chunk_prefill(q, k, v, g, b, w, pk, slots, fmt, initial=initial, out=out, force="triton")
    ref = chunk_prefill(q, k, v, g, b, w, pr, slots, fmt, initial=initial, force="torch")
    assert not torch.isnan(out).any()
    # the GPU kernel multiplies in tf32 (~3e-4 relative per product); the interpreter in fp32
    rel = 2e-3 if DEV == "cuda" else 2e-5
    assert (ok - ref).abs().max() <= rel * ref.abs().max()
    _assert_states_close(pk, pr, fmt, [3, 1, 0], fp32_rel=rel)


def test_dispatch_falls_back_for_unsupported_shapes_and_formats():
    x = torch.zeros(1, device=DEV)
    assert backend(x, 8, 32) == "torch" and backend(x, 48, 32) == "torch"
    assert backend(x, 32, 32) == "triton"
    int4 = StateQuantConfig("int8", rounding="error-feedback", residual="int4")
    assert backend(x, 32, 32, int4) == "torch"


def test_int4_residual_pool_runs_on_the_reference_path():
    """A fresh int4-residual pool holds a zero residual; decode_step dispatches it to PyTorch."""
    fmt = StateQuantConfig("int8", rounding="error-feedback", residual="int4")
    gen = torch.Generator().manual_seed(4)
    pool = new_state_pool(P, HV, K, V, fmt, DEV)
    assert torch.all(pool.residual_value(fmt) == 0)
    slots = torch.tensor(SLOTS, device=DEV)
    inputs = _step_inputs(gen)
    o = decode_step(*inputs, pool, slots, fmt)
    assert o.shape == (B, HV, V) and torch.isfinite(o).all() and pool.residual.shape[-1] == V // 2


def test_fp8_linear_matches_dequantized_product():
    gen = torch.Generator().manual_seed(9)
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 7, 64, generator=gen)
    codes, scales = quantize_weight_fp8(lin.weight.detach())
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (48,)
    w_deq = codes.float() * scales[:, None]
    assert (w_deq - lin.weight).abs().max() <= lin.weight.abs().amax(1).max() / 16
    xs = x.abs().amax(-1, keepdim=True) / 448
    x_deq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    y = fp8_linear(x, codes, scales, lin.bias.detach())
    torch.testing.assert_close(y, x_deq @ w_deq.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    ref = lin(x).detach()
    mod = Fp8Linear(lin)
    assert (mod(x) - ref).norm() / ref.norm() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_full_shape_checks():
    """The full-shape decode check of tools/gpu_check_kernels.py (H=16, K=V=128, B=64)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_check_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for fmt in (StateQuantConfig("int8"), StateQuantConfig("fp8", rounding="error-feedback")):
        row = mod.check_decode(fmt)
        assert row["ok"], row


def test_decode_launch_rejects_unknown_options():
    """A misspelt launch override fails loudly instead of silently running the default launch."""
    from gdn2q.kernels.decode import launch_params

    with pytest.raises(TypeError, match="blockk"):
        launch_params(StateQuantConfig("int8"), 8, 4, blockk=8)
    assert launch_params(StateQuantConfig("int8"), 8, 4, block_k=16, unroll=None)["block_k"] == 16
