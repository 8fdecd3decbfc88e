"""Small fused kernels around the recurrence in the decode step of :class:`gdn2q.kernels.bench.KernelLM`.

At serving batch sizes one decode step moves little data per layer, so its time goes to kernel launches, and
the PyTorch glue of a layer (RMSNorms, residual adds, the q/k/v short convs, the gated output norm, SwiGLU,
the per-token fp8 quantization in front of every fp8 projection) was ~70 of them. Each kernel here does one
of those pieces over whole rows in one launch; with ``fp8=True`` the ones that feed an fp8 projection write
e4m3 codes and one fp32 scale per row (absmax / 448, as :func:`gdn2q.kernels.fp8_linear.quantize_weight_fp8`
does for weights), so the activation quantization costs no launch of its own.

Each entry point runs its Triton kernel for CUDA tensors (or CPU tensors under the Triton interpreter) and
its PyTorch reference otherwise; the references are also the tests' oracles. The kernels are hand-written for
these layouts (rows of a fused projection output in, the contiguous planes the recurrence kernel reads out),
which no library kernel matches.

The kernels of the decode step (add_rms_norm, decode_inputs_low_rank, swiglu, and gated_rms_norm_rows where the
recurrence kernel does not run the output norm itself; low_rank_up and decode_inputs in prefill) take part in
programmatic dependent launch (:mod:`gdn2q.kernels.pdl`): each lets the next kernel launch at once, then
waits for the previous one before its first load. Their weights are read after the wait too: they are a few KB,
loaded alongside the activations, and the entry points then put no condition on where their inputs come from
(low_rank_up's 1 MB only has its lines asked of L2 before the wait, a hint that reads nothing).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gdn2q.kernels import pdl
from gdn2q.kernels.decode import gates_from_preactivations
from gdn2q.kernels.fp8_gemm import card_name
from gdn2q.kernels.fp8_linear import FP8, Fp8Rows, quantize_rows_reference
from gdn2q.kernels.reference import gated_rms_norm, gates
from gdn2q.kernels.state_io import INTERPRETED, fp8_ulp, rne
from gdn2q.model.norms import rms_normalize


def use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter (tests)."""
    from gdn2q.kernels import available

    interp = os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu"
    return available() and (x.is_cuda or interp)


# num_warps of the one-row-per-program kernels, by card and kernel, where a sweep inside the graphed decode step
# measured a better one than the rule of _warps (tools/tune_gemm_in_step.py --glue). add_rms_norm at 16 warps:
# H200, two runs on two machines, 1.3268 / 1.3309 ms per step against the rule's 1.3486-1.3587 / 1.3533-1.3623;
# H100 1.4507 against 1.4631 / 1.4669.
GLUE_WARPS: dict[str, dict[str, int]] = {"NVIDIA H200": {"add_rms_norm": 16},
                                         "NVIDIA H100 80GB HBM3": {"add_rms_norm": 16}}


def _warps(n: int, kernel: str, device: torch.device) -> int:
    """:data:`GLUE_WARPS`' entry, else about 16 elements per thread over n padded elements."""
    return GLUE_WARPS.get(card_name(device), {}).get(kernel) or max(1, min(16, n // 512))


# ---- PyTorch references ----

def _out(y: torch.Tensor, dtype: torch.dtype, fp8: bool) -> torch.Tensor | Fp8Rows:
    return quantize_rows_reference(y) if fp8 else y.to(dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           fp8: bool = False) -> torch.Tensor | Fp8Rows:
    if delta is not None:   # fp32 split-K partials [S, M, D] are summed first; x rounds once, in its dtype
        x.add_(delta.float().sum(0) if delta.dim() == 3 else delta)
    return _out(rms_normalize(x, weight, eps), x.dtype, fp8)


def gated_rms_norm_reference(o: torch.Tensor, z: torch.Tensor, z_bias: torch.Tensor | None, weight: torch.Tensor,
                             eps: float, activation: str, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    return _out(gated_rms_norm(o, z, z_bias, weight, eps, activation), o.dtype, fp8)


def swiglu_reference(y: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    g, u = y.float().chunk(2, dim=-1)
    return _out(F.silu(g) * u, y.dtype, fp8)


def decode_inputs_reference(y1: torch.Tensor, y2: torch.Tensor, window: torch.Tensor, taps: torch.Tensor,
                            conv_bias: torch.Tensor | None, kd: int, vd: int) -> tuple[torch.Tensor, ...]:
    C = 2 * kd + vd
    window.copy_(torch.cat([window[..., 1:], y1[:, :C].unsqueeze(-1)], dim=-1))
    y = (window.float() * taps.float()).sum(-1)
    if conv_bias is not None:
        y = y + conv_bias.float()
    q, k, v = F.silu(y).to(y1.dtype).split([kd, kd, vd], dim=-1)
    b, w = y1[:, C:C + kd + vd].split([kd, vd], dim=-1)
    return tuple(t.contiguous() for t in (q, k, v, y2[:, :kd], b, w))


def low_rank_up_reference(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    r = x.shape[1] // 2
    return torch.cat([F.linear(x[:, :r], weight[:split]), F.linear(x[:, r:], weight[split:])], dim=-1)


# ---- Triton kernels ----

@triton.jit
def _e4m3_rne(y):
    """y (|y| <= 448) as e4m3 codes, rounded to the nearest value, ties to even.

    The GPU's conversion does exactly that. The Triton CPU interpreter the tests run on drops mantissa carries
    in its own fp32 -> fp8 cast (7.9 -> 4.0), so there y is first rounded onto the e4m3 grid in fp32, which
    makes its cast exact. (On the GPU that emulation cost about 20 instructions per element, in kernels that
    take one row per program and wait on each of them.)
    """
    if INTERPRETED:
        ulp = fp8_ulp(y)
        y = rne(y / ulp) * ulp
    return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _store_rows(y, offs, mask, out_ptr, scales_ptr, FP8: tl.constexpr):
    """Store one row tile y: in out's dtype, or as e4m3 codes with the row's scale (absmax / 448)."""
    if FP8:
        s = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=None), 1e-12) / 448.0
        c = _e4m3_rne(tl.minimum(tl.maximum(y / s, -448.0), 448.0))
        tl.store(out_ptr + offs, c, mask=mask)
        tl.store(scales_ptr, s)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, stride, N: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    m = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=m, other=0.0).to(tl.float32)
    _store_rows(x, row * N + cols, m, codes_ptr, scales_ptr + row, True)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, scales_ptr, d_split_stride, eps, D: tl.constexpr,
                         BD: tl.constexpr, ADD: tl.constexpr, S: tl.constexpr, FP8: tl.constexpr,
                         PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    offs = row * D + cols
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if ADD:  # the residual stream keeps the model dtype, as x = x + h does
        d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
        for s in tl.static_range(1, S):   # the split-K partials of an fp8 GEMM, summed where they are consumed
            d += tl.load(d_ptr + s * d_split_stride + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + d).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, x, mask=m)
    xf = x.to(tl.float32)
    y = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps) * tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    _store_rows(y, offs, m, out_ptr, scales_ptr + row, FP8)


@triton.jit
def _gated_norm_kernel(o_ptr, z_ptr, zb_ptr, w_ptr, out_ptr, scales_ptr, z_stride, eps, HV: tl.constexpr,
                       V: tl.constexpr, HP: tl.constexpr, VP: tl.constexpr, BIAS: tl.constexpr,
                       SIGMOID: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HP)
    v = tl.arange(0, VP)
    m = (h < HV)[:, None] & (v < V)[None, :]
    cols = h[:, None] * V + v[None, :]
    o = tl.load(o_ptr + row * (HV * V) + cols, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * z_stride + cols, mask=m, other=0.0).to(tl.float32)
    if BIAS:  # the bias of g_proj's second layer, left out of the low-rank GEMM
        z += tl.load(zb_ptr + cols, mask=m, other=0.0).to(tl.float32)
    wv = tl.load(w_ptr + v, mask=v < V, other=0.0).to(tl.float32)
    n = o * tl.rsqrt(tl.sum(o * o, axis=1) / V + eps)[:, None] * wv[None, :]
    gate = tl.sigmoid(z) if SIGMOID else z * tl.sigmoid(z)
    _store_rows(n * gate, row * (HV * V) + cols, m, out_ptr, scales_ptr + row, FP8)


@triton.jit
def _swiglu_kernel(y_ptr, out_ptr, scales_ptr, I: tl.constexpr, BI: tl.constexpr, FP8: tl.constexpr,
                   PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BI)
    m = cols < I
    g = tl.load(y_ptr + row * (2 * I) + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + row * (2 * I) + I + cols, mask=m, other=0.0).to(tl.float32)
    _store_rows(g * tl.sigmoid(g) * u, row * I + cols, m, out_ptr, scales_ptr + row, FP8)


@triton.jit
def _decode_inputs_kernel(y1_ptr, y2_ptr, win_ptr, taps_ptr, cb_ptr, alog_ptr, dtb_ptr, out_ptr, gout_ptr, lr_ptr,
                          z_ptr, s1, s2, B, row_programs, KD: tl.constexpr, VD: tl.constexpr, HK: tl.constexpr,
                          W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                          CBIAS: tl.constexpr, GATES: tl.constexpr, NEG_EIG: tl.constexpr, LOW_RANK: tl.constexpr,
                          R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """The first ``row_programs`` programs take channel blocks of one sequence (:func:`_inputs_row`); with
    LOW_RANK the rest compute f and z through the low-rank second layers (:func:`_inputs_low_rank`)."""
    pdl.launch_dependents(PDL)
    pid = tl.program_id(0)
    if LOW_RANK and PDL:   # constant weights: their lines can come to L2 while the kernel before runs
        LINE: tl.constexpr = 1024 // lr_ptr.dtype.element_ty.primitive_bitwidth   # elements per 128 bytes
        n = (tl.maximum(pid - row_programs, 0) % ((KD + VD) // BN)) * BN + tl.arange(0, BN)
        pdl.prefetch_l2(lr_ptr + n[:, None] * R + (tl.arange(0, (R + LINE - 1) // LINE) * LINE)[None, :])
    pdl.wait(PDL)
    if pid < row_programs:
        _inputs_row(y1_ptr, y2_ptr, win_ptr, taps_ptr, cb_ptr, alog_ptr, dtb_ptr, out_ptr, gout_ptr, s1, s2, B,
                    pid // NB, pid % NB, KD, VD, HK, W, WP, BLOCK, CBIAS, GATES, NEG_EIG, LOW_RANK)
    else:
        if LOW_RANK:   # (the launch without it has no programs past row_programs)
            _inputs_low_rank(y1_ptr, alog_ptr, dtb_ptr, gout_ptr, lr_ptr, z_ptr, s1, B, pid - row_programs, KD,
                             VD, HK, R, BM, BN)


@triton.jit
def _inputs_row(y1_ptr, y2_ptr, win_ptr, taps_ptr, cb_ptr, alog_ptr, dtb_ptr, out_ptr, gout_ptr, s1, s2, B, row,
                blk, KD: tl.constexpr, VD: tl.constexpr, HK: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                BLOCK: tl.constexpr, CBIAS: tl.constexpr, GATES: tl.constexpr, NEG_EIG: tl.constexpr,
                LOW_RANK: tl.constexpr):
    """Channels c of one sequence in the order q k v b w f: conv step of q|k|v, copies of b|w|f; every one of
    the six lands in its own contiguous [B, n] plane of out. With GATES, b|w|f leave as the fp32 gates
    (GDN2_SPEC.md 1.2 steps 3-4) in the planes of gout instead, computed once per channel here rather than
    in every program of the recurrence kernel that updates the head. With LOW_RANK, f is not taken here."""
    C: tl.constexpr = 2 * KD + VD
    F0: tl.constexpr = 3 * KD + 2 * VD          # q k v b w come from y1, f from y2
    row = row.to(tl.int64)
    c = blk * BLOCK + tl.arange(0, BLOCK)
    live = c < (F0 if LOW_RANK else F0 + KD)
    x = tl.load(y1_ptr + row * s1 + c, mask=c < F0, other=0.0)
    if not LOW_RANK:
        x = tl.where(c < F0, x, tl.load(y2_ptr + row * s2 + (c - F0), mask=live & (c >= F0), other=0.0))
    conv = c < C
    # Shift the window one step in place: read positions 1.., barrier, then write 0.. (the barrier orders one
    # thread's read before another's write to the same element, whatever layout the compiler picks).
    t = tl.arange(0, WP)[None, :]
    wm = conv[:, None] & (t < W)
    win = win_ptr + (row * C + c)[:, None] * W + t
    old = tl.load(win + 1, mask=wm & (t < W - 1), other=0.0)
    new = tl.where(t == W - 1, x[:, None], old)
    tl.debug_barrier()
    tl.store(win, new, mask=wm)
    taps = tl.load(taps_ptr + c[:, None] * W + t, mask=wm, other=0.0).to(tl.float32)
    acc = tl.sum(new.to(tl.float32) * taps, axis=1)
    if CBIAS:
        acc += tl.load(cb_ptr + c, mask=conv, other=0.0).to(tl.float32)
    val = tl.where(conv, acc * tl.sigmoid(acc), x.to(tl.float32))
    start = tl.where(c < KD, 0, tl.where(c < 2 * KD, KD, tl.where(c < C, 2 * KD, tl.where(
        c < C + KD, C, tl.where(c < F0, C + KD, F0)))))
    size = tl.where(((c >= 2 * KD) & (c < C)) | ((c >= C + KD) & (c < F0)), VD, KD)
    if GATES:
        is_f = c >= F0
        fc = tl.where(is_f, c - F0, 0)
        g, gate = gates_from_preactivations(
            val, val, tl.load(alog_ptr + fc // HK, mask=live & is_f, other=0.0).to(tl.float32),
            tl.load(dtb_ptr + fc, mask=live & is_f, other=0.0).to(tl.float32), False)
        if NEG_EIG:   # only b doubles; w is a plain sigmoid
            gate = tl.where(c < C + KD, 2.0 * gate, gate)
        tl.store(out_ptr + B * start + row * size + (c - start), val.to(out_ptr.dtype.element_ty), mask=conv)
        tl.store(gout_ptr + B * (start - C) + row * size + (c - start), tl.where(is_f, g, gate),
                 mask=live & (c >= C))
    else:
        tl.store(out_ptr + B * start + row * size + (c - start), val.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _low_rank_dot(x, w):
    """x w^T in fp32. fp32 inputs: exact fp32 products, not tf32; the interpreter takes that path too (its bf16
    dot is wrong)."""
    if INTERPRETED or x.dtype == tl.float32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _inputs_low_rank(y1_ptr, alog_ptr, dtb_ptr, gout_ptr, lr_ptr, z_ptr, s1, B, j, KD: tl.constexpr,
                     VD: tl.constexpr, HK: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Tile j of [f | z] = [fr | gr] . [f weight; g weight]^T over BM sequences and BN channels (a tile never
    straddles f and z): f goes on as the fp32 log decay g into its plane of gout, z in the model dtype into
    z_ptr [B, VD]. Both are rounded to the model dtype first, as the unfused low-rank GEMM's output was."""
    F0: tl.constexpr = 3 * KD + 2 * VD          # fr | gr follow q k v b w in y1
    NT: tl.constexpr = (KD + VD) // BN
    n0 = (j % NT) * BN
    rows = (j // NT) * BM + tl.arange(0, BM)
    rm = rows < B
    rr = tl.arange(0, R)
    half = (n0 >= KD).to(tl.int32)
    x = tl.load(y1_ptr + rows.to(tl.int64)[:, None] * s1 + F0 + half * R + rr[None, :], mask=rm[:, None], other=0.0)
    w = tl.load(lr_ptr + (n0 + tl.arange(0, BN))[:, None] * R + rr[None, :])
    val = _low_rank_dot(x, w).to(y1_ptr.dtype.element_ty)
    if n0 < KD:
        fc = n0 + tl.arange(0, BN)
        g = gates_from_preactivations(val.to(tl.float32), val.to(tl.float32),
                                      tl.load(alog_ptr + fc // HK).to(tl.float32)[None, :],
                                      tl.load(dtb_ptr + fc).to(tl.float32)[None, :], False)[0]
        tl.store(gout_ptr + B * (KD + VD) + rows[:, None] * KD + fc[None, :], g, mask=rm[:, None])
    else:
        zc = n0 - KD + tl.arange(0, BN)
        tl.store(z_ptr + rows[:, None] * VD + zc[None, :], val, mask=rm[:, None])


@triton.jit
def _low_rank_up_kernel(x_ptr, w_ptr, out_ptr, M, x_stride, SPLIT: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr):
    """out[m, n] = x[m, half(n) * R:][:R] . w[n] for one [BLOCK_M, BLOCK_N] tile, half(n) = n >= SPLIT (a block
    never straddles SPLIT). The weights depend on no earlier kernel: their lines go to L2 before the wait."""
    pdl.launch_dependents(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R)
    w_rows = w_ptr + rn[:, None] * R
    if PDL:
        pdl.prefetch_l2(w_rows + (tl.arange(0, (R + LINE - 1) // LINE) * LINE)[None, :])
    pdl.wait(PDL)
    half = (tl.program_id(0) * BLOCK_N >= SPLIT).to(tl.int32)
    x = tl.load(x_ptr + rm[:, None] * x_stride + half * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
    w = tl.load(w_rows + rr[None, :])
    acc = _low_rank_dot(x, w)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None])


# ---- entry points ----

def _rows_out(like: torch.Tensor, M: int, N: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if fp8:
        return torch.empty(M, N, dtype=FP8, device=like.device), torch.empty(M, 1, device=like.device)
    return torch.empty(M, N, dtype=like.dtype, device=like.device), like   # scales never written


def quantize_rows_fp8(x: torch.Tensor) -> Fp8Rows:
    """Per-row e4m3 codes and scales of x [M, K] (unit column stride) in one launch."""
    if not use_triton(x):
        return quantize_rows_reference(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, N = x.shape
    codes, scales = _rows_out(x, M, N, True)
    BN = triton.next_power_of_2(N)
    _quantize_kernel[(M,)](x, codes, scales, x.stride(0), N=N, BN=BN, num_warps=_warps(BN, "quantize", x.device))
    return codes, scales


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """RMSNorm of the residual rows x [M, D] after ``x += delta`` (in place, skipped when delta is None).

    delta is [M, D], or the fp32 split-K partial sums [S, M, D] of an fp8 GEMM
    (:func:`gdn2q.kernels.fp8_linear.fp8_matmul` with ``partials=True``), summed here in fp32.
    """
    if not use_triton(x):
        return add_rms_norm_reference(x, delta, weight, eps, fp8)
    M, D = x.shape
    out, scales = _rows_out(x, M, D, fp8)
    BD = triton.next_power_of_2(D)
    d = x if delta is None else delta.contiguous()
    _add_rms_norm_kernel[(M,)](x, d, weight, out, scales, M * D, eps, D=D, BD=BD, ADD=delta is not None,
                               S=d.shape[0] if d.dim() == 3 else 1, FP8=fp8,
                               num_warps=_warps(BD, "add_rms_norm", x.device), **pdl.launch_options(x.device))
    return (out, scales) if fp8 else out


def gated_rms_norm_rows(o: torch.Tensor, z: torch.Tensor, z_bias: torch.Tensor | None, weight: torch.Tensor,
                        eps: float, activation: str, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """Per-head RMSNorm of o [M, HV, V] gated by act(z + z_bias), z [M, HV*V]; returns rows [M, HV*V].

    ``activation``: "sigmoid" (fla-trained) or "swish" (NVIDIA-trained), as gdn2q.model.norms.gated_rms_norm.
    """
    if not use_triton(o):
        return gated_rms_norm_reference(o, z, z_bias, weight, eps, activation, fp8)
    M, HV, V = o.shape
    o = o.contiguous()
    if z.stride(-1) != 1:
        z = z.contiguous()
    out, scales = _rows_out(o, M, HV * V, fp8)
    HP, VP = triton.next_power_of_2(HV), triton.next_power_of_2(V)
    _gated_norm_kernel[(M,)](o, z, z if z_bias is None else z_bias, weight, out, scales, z.stride(0), eps, HV=HV,
                             V=V, HP=HP, VP=VP, BIAS=z_bias is not None, SIGMOID=activation == "sigmoid", FP8=fp8,
                             num_warps=_warps(HP * VP, "gated_norm", o.device), **pdl.launch_options(o.device))
    return (out, scales) if fp8 else out


def swiglu(y: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """silu(gate) * up of the fused MLP input projection y [M, 2I] = [gate | up]; returns [M, I]."""
    if not use_triton(y):
        return swiglu_reference(y, fp8)
    y = y.contiguous()
    M, I = y.shape[0], y.shape[1] // 2
    out, scales = _rows_out(y, M, I, fp8)
    BI = triton.next_power_of_2(I)
    _swiglu_kernel[(M,)](y, out, scales, I=I, BI=BI, FP8=fp8, num_warps=_warps(BI, "swiglu", y.device),
                         **pdl.launch_options(y.device))
    return (out, scales) if fp8 else out


LOW_RANK_MAX_M = 256   # larger inputs (prefill) go to cuBLAS
INPUTS_BLOCK = 1024    # channels per program of one sequence in the decode-inputs kernel


def low_rank_up(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    """The second low-rank layers of f_proj and g_proj in one launch: x [M, 2R] = [fr | gr] (unit column stride),
    weight [N, R] = [f weight; g weight] with the f rows first (``split`` of them) -> [f | z] [M, N].

    Why a kernel: cuBLAS takes it as two GEMMs, or one over a block-diagonal weight that is half zeros, and
    neither joins the PDL chain of the step, so the kernels around it start only after it completes.
    """
    M, R = x.shape[0], x.shape[1] // 2
    N = weight.shape[0]
    BLOCK_N = 32
    if not use_triton(x) or M > LOW_RANK_MAX_M or split % BLOCK_N or N % BLOCK_N or R & (R - 1) or R < 16:
        return low_rank_up_reference(x, weight, split)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BLOCK_M = min(64, max(16, triton.next_power_of_2(M)))
    _low_rank_up_kernel[(N // BLOCK_N, triton.cdiv(M, BLOCK_M))](
        x, weight.contiguous(), out, M, x.stride(0), SPLIT=split, N=N, R=R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        LINE=128 // weight.element_size(), num_warps=4, **pdl.launch_options(x.device))
    return out


def decode_inputs(y1: torch.Tensor, y2: torch.Tensor, window: torch.Tensor, taps: torch.Tensor,
                  conv_bias: torch.Tensor | None, kd: int, vd: int, A_log: torch.Tensor | None = None,
                  dt_bias: torch.Tensor | None = None, allow_neg_eigval: bool = False) -> tuple[torch.Tensor, ...]:
    """The recurrence inputs of one decode token from the fused projection outputs, in one launch.

    y1 [B, >= 3kd+2vd] holds raw q|k|v|b|w, y2 [B, >= kd] holds f (unit column strides); window [B, 2kd+vd, W]
    (the last W raw q|k|v inputs, oldest first) is shifted in place and taps [2kd+vd, W] convolve it (+ SiLU).
    Returns contiguous (q, k, v, f, b, w) of shapes [B, kd|vd] in y1's dtype; with A_log and dt_bias, f, b, w
    are the fp32 gates (g, b, w) of :func:`gdn2q.kernels.reference.gates` instead.
    """
    gates_on = A_log is not None
    if not use_triton(y1):
        q, k, v, f, b, w = decode_inputs_reference(y1, y2, window, taps, conv_bias, kd, vd)
        if gates_on:
            hk = A_log.shape[0]
            g, b, w = gates(f.view(-1, hk, kd // hk), b.view(-1, hk, kd // hk), w, A_log, dt_bias, allow_neg_eigval)
            f, b = g.flatten(1), b.flatten(1)
        return q, k, v, f, b, w
    B, W = y1.shape[0], window.shape[-1]
    sizes = (kd, kd, vd, kd, vd, kd)
    out = torch.empty(B * sum(sizes[:3] if gates_on else sizes), dtype=y1.dtype, device=y1.device)
    gout = torch.empty(B * sum(sizes[3:]), dtype=torch.float32, device=y1.device) if gates_on else out
    NB = triton.cdiv(sum(sizes), INPUTS_BLOCK)
    _decode_inputs_kernel[(B * NB,)](
        y1, y2, window, taps, taps if conv_bias is None else conv_bias, A_log if gates_on else taps,
        dt_bias if gates_on else taps, out, gout, taps, taps, y1.stride(0), y2.stride(0), B, B * NB, KD=kd, VD=vd,
        HK=kd // A_log.shape[0] if gates_on else 1, W=W, WP=triton.next_power_of_2(W), BLOCK=INPUTS_BLOCK, NB=NB,
        CBIAS=conv_bias is not None, GATES=gates_on, NEG_EIG=allow_neg_eigval, LOW_RANK=False, R=16, BM=16,
        BN=16, num_warps=4, **pdl.launch_options(y1.device))
    planes = out.split([B * n for n in sizes[:3]]) + gout.split([B * n for n in sizes[3:]]) if gates_on else \
        out.split([B * n for n in sizes])
    q, k, v, b, w, f = (p.view(B, n) for p, n in zip(planes, sizes, strict=True))
    return q, k, v, f, b, w


def decode_inputs_low_rank(y1: torch.Tensor, low_rank: torch.Tensor, window: torch.Tensor, taps: torch.Tensor,
                           conv_bias: torch.Tensor | None, kd: int, vd: int, A_log: torch.Tensor,
                           dt_bias: torch.Tensor, allow_neg_eigval: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`decode_inputs` with the gates, fused with :func:`low_rank_up`: y1 [B, >= 3kd+2vd+2R] holds raw
    q|k|v|b|w|fr|gr and low_rank [kd+vd, R] the f and g second-layer weights. Returns contiguous
    (q, k, v, g, b, w, z): q, k, v, z [B, kd|vd] in y1's dtype, the gates g, b, w in fp32.

    One launch instead of two: programs of one sequence's channel blocks run the conv and the b, w gates,
    programs of [BM sequences, BN channels] tiles the low-rank products for f (on to the log decay) and z.
    """
    R = low_rank.shape[1]
    F0 = 3 * kd + 2 * vd
    B = y1.shape[0]
    BN = 32
    if (not use_triton(y1) or B > LOW_RANK_MAX_M or kd % BN or vd % BN or R & (R - 1) or R < 16
            or y1.stride(-1) != 1):
        y2 = low_rank_up_reference(y1[:, F0:F0 + 2 * R], low_rank, kd)
        q, k, v, g, b, w = decode_inputs(y1, y2, window, taps, conv_bias, kd, vd, A_log, dt_bias, allow_neg_eigval)
        return q, k, v, g, b, w, y2[:, kd:].contiguous()
    W = window.shape[-1]
    sizes = (kd, kd, vd, kd, vd, kd)
    out = torch.empty(B * sum(sizes[:3]), dtype=y1.dtype, device=y1.device)
    gout = torch.empty(B * sum(sizes[3:]), dtype=torch.float32, device=y1.device)
    z = torch.empty(B, vd, dtype=y1.dtype, device=y1.device)
    NB = triton.cdiv(F0, INPUTS_BLOCK)
    BM = min(64, max(16, triton.next_power_of_2(B)))
    dot_programs = triton.cdiv(B, BM) * ((kd + vd) // BN)
    _decode_inputs_kernel[(B * NB + dot_programs,)](
        y1, y1, window, taps, taps if conv_bias is None else conv_bias, A_log, dt_bias, out, gout,
        low_rank.contiguous(), z, y1.stride(0), 0, B, B * NB, KD=kd, VD=vd, HK=kd // A_log.shape[0], W=W,
        WP=triton.next_power_of_2(W), BLOCK=INPUTS_BLOCK, NB=NB, CBIAS=conv_bias is not None, GATES=True,
        NEG_EIG=allow_neg_eigval, LOW_RANK=True, R=R, BM=BM, BN=BN, num_warps=4, **pdl.launch_options(y1.device))
    planes = out.split([B * n for n in sizes[:3]]) + gout.split([B * n for n in sizes[3:]])
    q, k, v, b, w, g = (p.view(B, n) for p, n in zip(planes, sizes, strict=True))
    return q, k, v, g, b, w, z
