"""The glue kernels of the decode step (gdn2q.kernels.glue) against their PyTorch references.

On a machine without CUDA they run under the Triton interpreter; every buffer they allocate starts as NaN, so
an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from gdn2q.kernels import glue
from gdn2q.kernels.reference import gates

pytestmark = [pytest.mark.skipif(not glue.use_triton(torch.empty(0, device="cuda" if torch.cuda.is_available()
                                                                  else "cpu")), reason="Triton cannot run here"),
              pytest.mark.usefixtures("poisoned_empty")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def _same(got, ref, tol: float = 1e-5) -> None:
    """Same tensor, or for fp8 rows the same scales and codes (a code may sit one e4m3 step off on a tie)."""
    if isinstance(ref, tuple):
        torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=0)
        assert got[0].dtype == ref[0].dtype == torch.float8_e4m3fn
        g, r = got[0].float(), ref[0].float()
        torch.testing.assert_close(g, r, rtol=0.0625, atol=2.0 ** -9)
        assert (g != r).float().mean() < 0.01
    else:
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_quantize_rows_matches_reference_and_rounds_to_nearest_even():
    x = _rand(5, 200, seed=0) * torch.logspace(-3, 2, 5, device=DEV)[:, None]
    x[0, :4] = torch.tensor([7.9, -124.5, 0.0, 1e-4])  # binade carries, a zero, an e4m3 subnormal
    codes, scales = glue.quantize_rows_fp8(x)
    ref_codes, ref_scales = glue.quantize_rows_reference(x)
    torch.testing.assert_close(scales, ref_scales, rtol=0, atol=0)
    torch.testing.assert_close(codes.float(), ref_codes.float(), rtol=0, atol=0)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_add_rms_norm(fp8: bool, add: bool):
    x, d, w = _rand(3, 96, seed=1), _rand(3, 96, seed=2), _rand(96, seed=3)
    x_ref = x.clone()
    got = glue.add_rms_norm(x, d if add else None, w, 1e-6, fp8)
    ref = glue.add_rms_norm_reference(x_ref, d if add else None, w, 1e-6, fp8)
    torch.testing.assert_close(x, x_ref)   # the residual is updated in place (or left alone)
    _same(got, ref)


def test_add_rms_norm_keeps_the_residual_in_bf16():
    x, d = (_rand(2, 64, seed=s, dtype=torch.bfloat16) for s in (4, 5))
    w = _rand(64, seed=6, dtype=torch.bfloat16)
    x_ref = x.clone()
    got = glue.add_rms_norm(x, d, w, 1e-6)
    ref = glue.add_rms_norm_reference(x_ref, d, w, 1e-6)
    assert x.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(x, x_ref)   # bf16 tolerance: the interpreter's own fp32 -> bf16 cast is not RNE
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("S", [1, 3])
def test_add_rms_norm_sums_split_k_partials(S: int, fp8: bool):
    """delta as the fp32 partial sums [S, M, D] of a split-K fp8 GEMM: summed in fp32, x rounded once."""
    x = _rand(3, 96, seed=17, dtype=torch.bfloat16)
    parts, w = _rand(S, 3, 96, seed=18), _rand(96, seed=19)
    x0, x_ref = x.clone(), x.clone()
    got = glue.add_rms_norm(x, parts, w, 1e-6, fp8)
    glue.add_rms_norm_reference(x_ref, parts, w, 1e-6, fp8)
    torch.testing.assert_close(x_ref, (x0.float() + parts.sum(0)).bfloat16(), rtol=0, atol=0)
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(x, x_ref)   # bf16 tolerance: the interpreter's fp32 -> bf16 cast is not RNE
    # the norm of the x it wrote (a bf16 output gets bf16 tolerance, as x)
    _same(got, glue.add_rms_norm_reference(x.clone(), None, w, 1e-6, fp8), tol=1e-5 if fp8 else 2 ** -7)


@pytest.mark.parametrize(("activation", "bias", "fp8"), [("sigmoid", True, False), ("swish", False, True)])
def test_gated_rms_norm_rows(activation: str, bias: bool, fp8: bool):
    M, HV, V = 3, 3, 16                                   # HV not a power of two: masked head rows
    o, w = _rand(M, HV, V, seed=7), _rand(V, seed=8)
    z = _rand(M, HV * V + 10, seed=9)[:, 5:5 + HV * V]    # a column slice of a wider projection output
    zb = _rand(HV * V, seed=10) if bias else None
    _same(glue.gated_rms_norm_rows(o, z, zb, w, 1e-6, activation, fp8),
          glue.gated_rms_norm_reference(o, z, zb, w, 1e-6, activation, fp8))


@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu(fp8: bool):
    y = _rand(3, 2 * 80, seed=11)
    _same(glue.swiglu(y, fp8), glue.swiglu_reference(y, fp8))


@pytest.mark.parametrize(("conv_bias", "W"), [(False, 4), (True, 3)])
def test_decode_inputs(conv_bias: bool, W: int):
    B, kd, vd = 2, 32, 64
    C = 2 * kd + vd
    y1 = _rand(B, 3 * kd + 2 * vd + 7, seed=12)           # raw q k v b w, then other columns
    y2 = _rand(B, kd + 16, seed=13)                       # f, then z
    win, taps = _rand(B, C, W, seed=14), _rand(C, W, seed=15)
    cb = _rand(C, seed=16) if conv_bias else None
    win_ref = win.clone()
    got = glue.decode_inputs(y1, y2, win, taps, cb, kd, vd)
    ref = glue.decode_inputs_reference(y1, y2, win_ref, taps, cb, kd, vd)
    torch.testing.assert_close(win, win_ref, rtol=0, atol=0)
    for g, r in zip(got, ref, strict=True):
        assert g.is_contiguous() and g.shape == r.shape
        _same(g, r)


@pytest.mark.parametrize("neg", [False, True])
def test_decode_inputs_with_gates(neg: bool):
    """With A_log/dt_bias the kernel emits the fp32 gates g, b, w of kernels.reference.gates (GVA heads of 16)."""
    B, kd, vd, W = 2, 32, 64, 4
    C = 2 * kd + vd
    y1 = _rand(B, 3 * kd + 2 * vd + 7, seed=22)
    y2 = _rand(B, kd + 16, seed=23)
    win, taps = _rand(B, C, W, seed=24), _rand(C, W, seed=25)
    A_log, dt_bias = _rand(kd // 16, seed=26).abs(), _rand(kd, seed=27)
    win_ref = win.clone()
    got = glue.decode_inputs(y1, y2, win, taps, None, kd, vd, A_log, dt_bias, neg)
    q, k, v, f, b, w = glue.decode_inputs_reference(y1, y2, win_ref, taps, None, kd, vd)
    g_ref, b_ref, w_ref = gates(f.view(B, 2, 16), b.view(B, 2, 16), w, A_log, dt_bias, neg)
    for x, r in zip(got, (q, k, v, g_ref.flatten(1), b_ref.flatten(1), w_ref), strict=True):
        assert x.is_contiguous() and x.shape == r.shape and x.dtype == r.dtype
        torch.testing.assert_close(x.float(), r.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M", [1, 20, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_up(M: int, dtype: torch.dtype):
    """[fr | gr] (a strided slice of the fused projection rows) against the two low-rank second layers."""
    rows = _rand(M, 300, seed=M, dtype=dtype)
    x = rows[:, 20:20 + 2 * 32]
    weight = _rand(96 + 64, 32, seed=7, dtype=dtype)   # 96 f rows, then 64 g rows
    got = glue.low_rank_up(x, weight, 96)
    ref = glue.low_rank_up_reference(x.float(), weight.float(), 96)
    torch.testing.assert_close(ref[:, :96], x[:, :32].double() @ weight[:96].double().t(), check_dtype=False)
    assert got.shape == (M, 160) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3   # bf16: one rounding of the fp32 sum
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(("B", "neg", "conv_bias"), [(2, False, True), (20, True, False)])
def test_decode_inputs_low_rank(B: int, neg: bool, conv_bias: bool):
    """The fused launch against low_rank_up_reference followed by decode_inputs_reference and the gates."""
    kd, vd, R, W = 32, 64, 16, 4
    C, F0 = 2 * kd + vd, 3 * kd + 2 * vd
    y1 = _rand(B, F0 + 2 * R + 5, seed=40)
    weight = _rand(kd + vd, R, seed=41)
    win, taps = _rand(B, C, W, seed=42), _rand(C, W, seed=43)
    cb = _rand(C, seed=44) if conv_bias else None
    A_log, dt_bias = _rand(kd // 16, seed=45).abs(), _rand(kd, seed=46)
    win_ref = win.clone()
    got = glue.decode_inputs_low_rank(y1, weight, win, taps, cb, kd, vd, A_log, dt_bias, neg)
    y2 = glue.low_rank_up_reference(y1[:, F0:F0 + 2 * R], weight, kd)
    q, k, v, f, b, w = glue.decode_inputs_reference(y1, y2, win_ref, taps, cb, kd, vd)
    g_ref, b_ref, w_ref = gates(f.view(B, 2, 16), b.view(B, 2, 16), w, A_log, dt_bias, neg)
    torch.testing.assert_close(win, win_ref, rtol=0, atol=0)
    ref = (q, k, v, g_ref.flatten(1), b_ref.flatten(1), w_ref, y2[:, kd:])
    assert len(got) == len(ref)
    for x, r in zip(got, ref, strict=True):
        assert x.is_contiguous() and x.shape == r.shape and x.dtype == r.dtype
        torch.testing.assert_close(x.float(), r.float(), rtol=1e-5, atol=1e-5)


def test_glue_warps_table_overrides_the_rule_on_its_card_only(monkeypatch):
    dev = torch.device(DEV)
    assert glue._warps(8192, "swiglu", dev) == 16 and glue._warps(2048, "gated_norm", dev) == 4   # the rule
    monkeypatch.setattr(glue, "GLUE_WARPS", {glue.card_name(dev): {"swiglu": 2}, "another card": {"gated_norm": 8}})
    assert glue._warps(8192, "swiglu", dev) == 2
    assert glue._warps(2048, "gated_norm", dev) == 4
    y = _rand(3, 2 * 80, seed=11)
    _same(glue.swiglu(y), glue.swiglu_reference(y))
