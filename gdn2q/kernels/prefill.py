"""Chunked (WY form, chunk 64) Triton prefill that starts from a stored state and leaves S_T stored.

Five launches (GDN2_SPEC.md 2), shaped like fla's chunk_gdn2 so that only the state recurrence is sequential:
1. ``_score_kernel``, one program per (chunk, sequence x q/k head), all chunks in parallel: decayed score
   matrices Aqk and T as [64, 64] products over K slices, each 16-row block from factors decayed from the
   block's start (no exponential exceeds 1 off the diagonal; a diagonal block that decays by more than
   SAFE_DECAY nats is redone with exact pairwise exponents), and the inverse A = (I + T)^-1 by the exact
   product formula on the 16x16 diagonal blocks and block merging.
2. ``_wy_kernel``, same grid: Y = A E, U = A Z (for every value head of the q/k head), the decayed queries
   (gamma q), tail keys (gamma_C / gamma k) and total decay gamma_C, in K slices to bound registers.
3. ``_state_kernel``, one program per (V block, sequence x value head), sequential over chunks with two
   matrix products per chunk: R = U - Y S, S <- gamma_C S + Ktail^T R. It stores every chunk's start state
   and R for step 4, and the fp32 S_T.
4. ``_output_kernel``, one program per (chunk, V block, sequence x value head), in parallel:
   O = (gamma q) S_chunk + Aqk R (the output product is off the sequential path).
5. ``_store_kernel``: stores S_T into the pool slot in its format (same rounding code as the decode step).
The precision of each launch's products and of the tensors between launches follows ``dot_precision``
(:class:`LaunchPlan`, one precision per product group): bf16 operands where their rounding does not reach S_T or
moves it little, bf16 hi + lo split products where it does ("mixed", the default for bf16 inputs), or one
precision throughout. The carried state is always fp32.
Head dims K, V must be powers of two (16..256); T is arbitrary (the last chunk is zero-padded: padded rows of
Y, U, Ktail are zero, so they leave S unchanged).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gdn2q.kernels.decode import effective_static_scales, seed_tensor
from gdn2q.kernels.fp8_gemm import sm_count
from gdn2q.kernels.state_io import INTERPRETED, format_constexprs, load_codes, store_state
from gdn2q.quant.state import QuantizedState, StateQuantConfig

CHUNK = 64
SAFE_DECAY: tl.constexpr = tl.constexpr(60.0)


@triton.jit
def _value_head(bh, HQ: tl.constexpr, HV: tl.constexpr):
    """(sequence, value head, sequence x q/k head) of program index bh = sequence x value head (GVA)."""
    bi = bh // HV
    hv = bh % HV
    return bi, hv, bi * HQ + hv // (HV // HQ)


@triton.jit
def _rows(ptr, bi, h, t0, T, H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, c0: tl.constexpr,
          C: tl.constexpr):
    """Rows t0..t0+R, columns c0..c0+C of head h of a [B, T, H, D] tensor, as fp32 (0 past T)."""
    r = t0 + tl.arange(0, R)
    off = ((bi * T + r) * H + h).to(tl.int64)[:, None] * D + (c0 + tl.arange(0, C))[None, :]
    return tl.load(ptr + off, mask=(r < T)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _sumsq(x):
    return tl.sum(x * x, axis=1)


@triton.jit
def _inv_norm(ss, ON: tl.constexpr):
    """1 / sqrt(ss + 1e-6) for rows' sums of squares ss (the upstream L2 norm), or 1."""
    if ON:
        n = tl.rsqrt(ss + 1e-6)
    else:
        n = tl.full(ss.shape, 1.0, dtype=tl.float32)
    return n


@triton.jit
def _diag(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, t0, T, scale, HQ: tl.constexpr, K: tl.constexpr,
          L2NORM: tl.constexpr):
    """Diagonal 16x16 blocks of Aqk (j <= i) and T (j < i) with exact exponents gl_i - gl_j <= 0.

    The fallback for a block where some channel decays by more than SAFE_DECAY nats (the factored product
    overflows there): [16, 16, 8] products over K in slices of 8 columns.
    """
    i16 = tl.arange(0, 16)
    causal = (i16[:, None] >= i16[None, :])[:, :, None]
    nq = _inv_norm(_sumsq(_rows(q_ptr, bi, hq, t0, T, HQ, K, 16, 0, K)), L2NORM) * scale
    nk = _inv_norm(_sumsq(_rows(k_ptr, bi, hq, t0, T, HQ, K, 16, 0, K)), L2NORM)
    aq = tl.zeros([16, 16], dtype=tl.float32)
    tt = tl.zeros([16, 16], dtype=tl.float32)
    for c0 in tl.static_range(0, K, 8):
        q = _rows(q_ptr, bi, hq, t0, T, HQ, K, 16, c0, 8) * nq[:, None]
        k = _rows(k_ptr, bi, hq, t0, T, HQ, K, 16, c0, 8) * nk[:, None]
        bk = _rows(b_ptr, bi, hq, t0, T, HQ, K, 16, c0, 8) * k
        gl = tl.cumsum(_rows(g_ptr, bi, hq, t0, T, HQ, K, 16, c0, 8), axis=0)
        e = tl.exp(tl.where(causal, gl[:, None, :] - gl[None, :, :], float("-inf"))) * k[None, :, :]
        aq += tl.sum(q[:, None, :] * e, axis=2)
        tt += tl.sum(bk[:, None, :] * e, axis=2)
    return aq, tl.where(i16[:, None] > i16[None, :], tt, 0.0)


@triton.jit
def _inv16(t):
    """(I + t)^-1 for strictly lower triangular t [16, 16]: t^16 = 0, so it equals the exact product
    (I - t)(I + t^2)(I + t^4)(I + t^8) (four levels of small matrix products instead of a serial solve)."""
    i16 = tl.arange(0, 16)
    eye = tl.where(i16[:, None] == i16[None, :], 1.0, 0.0)
    t2 = _mm(t, t)
    t4 = _mm(t2, t2)
    x = _mm(eye - t, eye + t2)
    x = _mm(x, eye + t4)
    return _mm(x, eye + _mm(t4, t4))


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _split(x):
    """fp32 x as bf16 hi + lo (16 mantissa bits between them)."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, acc=None):
    """acc + a @ b with fp32 accumulation. "bf16": operands rounded to bf16 on the tensor cores (fla's choice);
    "bf16x3": fp32 operands split into bf16 hi + lo, three bf16 products (~2^-16 relative; the tf32 tensor-core
    rate is half of bf16's); else fp32 operands with that input precision ("tf32", "tf32x3", "ieee")."""
    if (DOT == "bf16" or DOT == "bf16x3") and INTERPRETED:  # the CPU interpreter's bf16 dot is wrong
        if DOT == "bf16":
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    elif DOT == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc)
    elif DOT == "bf16x3":
        ah, al = _split(a)
        bh, bl = _split(b)
        c = _dot3(ah, al, bh, bl, acc)
    else:
        c = tl.dot(a, b, acc=acc, input_precision=DOT)
    return c


@triton.jit
def _dot3(ah, al, bh, bl, acc=None):
    """acc + (ah + al) @ (bh + bl) for bf16 hi + lo operand pairs, less the al @ bl term (2^-16 relative)."""
    if INTERPRETED:
        c = tl.dot(ah.to(tl.float32) + al.to(tl.float32), bh.to(tl.float32) + bl.to(tl.float32), acc=acc,
                   input_precision="ieee")
    else:
        c = tl.dot(ah, bh, acc=tl.dot(al, bh, acc=tl.dot(ah, bl, acc=acc)))
    return c


@triton.jit
def _dot_a(a, ah, al, x, DOT: tl.constexpr):
    """a @ x, with a's bf16 hi + lo split (ah, al) made once by the caller for "bf16x3"."""
    if DOT == "bf16x3":
        xh, xl = _split(x)
        c = _dot3(ah, al, xh, xl)
    else:
        c = _dot(a, x, DOT)
    return c


@triton.jit
def _store_op(ptr, lo_ptr, off, x, SPLIT: tl.constexpr):
    """Store x in ptr's dtype, or as bf16 hi at ptr and lo at lo_ptr (the state kernel's split operands)."""
    if SPLIT:
        hi, lo = _split(x)
        tl.store(ptr + off, hi)
        tl.store(lo_ptr + off, lo)
    else:
        tl.store(ptr + off, x.to(ptr.dtype.element_ty))


@triton.jit
def _st16(ptr, base_row, r0: tl.constexpr, c0, x):
    i16 = tl.arange(0, 16)
    tl.store(ptr + (base_row + r0 + i16).to(tl.int64)[:, None] * 64 + c0 + i16[None, :],
             x.to(ptr.dtype.element_ty))


@triton.jit
def _ld16(ptr, base_row, r0: tl.constexpr, c0: tl.constexpr):
    i16 = tl.arange(0, 16)
    return tl.load(ptr + (base_row + r0 + i16).to(tl.int64)[:, None] * 64 + c0 + i16[None, :])


@triton.jit
def _row(x, r64, row: tl.constexpr):
    """Row ``row`` of x [64, C] as a [C] vector."""
    return tl.sum(tl.where((r64 == row)[:, None], x, 0.0), axis=0)


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, g_ptr, b_ptr, aqk_ptr, ainv_ptr, norms_ptr, qg_ptr, T, Tp, scale,
    HQ: tl.constexpr, K: tl.constexpr, L2NORM: tl.constexpr, DOT: tl.constexpr, KS: tl.constexpr,
):
    """Aqk and T of one chunk as [64, 64] products over K slices of KS columns, then A = (I + T)^-1.

    Row block I (16 rows) of both matrices is one product of factors decayed from the start S_I of the block:
    x_i exp(G_i - S_I) for rows i in block I and k_j exp(S_I - G_j) for columns j in blocks <= I, both built from
    in-block cumulative decays. Off the diagonal both exponents are <= 0; on it the second is at most the block's
    decay (the exact fallback takes blocks that decay by more than SAFE_DECAY). The L2 norms scale rows and
    columns afterwards, so one pass over q, k, g, b does it all with two [64, 64] accumulators live. T goes
    through the ainv rows as scratch to be cut into the 16x16 blocks of the inverse. The row norms (1 / |k|,
    scale / |q|) go to norms_ptr [rows, 2] for the WY and output kernels, which would otherwise load whole rows
    again; the decayed queries gamma q go to qg_ptr before their norm (the output kernel scales its rows).
    """
    n = tl.program_id(0)
    bq = tl.program_id(1)
    bi = bq // HQ
    hq = bq % HQ
    c0 = n * 64
    row0 = bq * Tp + c0
    r64 = tl.arange(0, 64)
    blk = (r64 // 16)[:, None]
    tr = tl.zeros([64, 64], dtype=tl.float32)
    ar = tl.zeros([64, 64], dtype=tl.float32)
    ssq = tl.zeros([64], dtype=tl.float32)
    ssk = tl.zeros([64], dtype=tl.float32)
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    d3 = 0.0
    for s0 in tl.static_range(0, K, KS):
        q = _rows(q_ptr, bi, hq, c0, T, HQ, K, 64, s0, KS)
        k = _rows(k_ptr, bi, hq, c0, T, HQ, K, 64, s0, KS)
        ssq += _sumsq(q)
        ssk += _sumsq(k)
        # in-block cumulative decay gl and block decays b0..b3: no chunk-level cumsum, whose cancellation
        # (G_i - G_j at |G| ~ 1000) would cost fp32 digits after a strong decay
        gl = tl.reshape(tl.cumsum(tl.reshape(_rows(g_ptr, bi, hq, c0, T, HQ, K, 64, s0, KS), [4, 16, KS]), axis=1),
                        [64, KS])
        b0 = _row(gl, r64, 15)
        b1 = _row(gl, r64, 31)
        b2 = _row(gl, r64, 47)
        b3 = _row(gl, r64, 63)
        d0 = tl.maximum(d0, tl.max(-b0, axis=0))                # largest decay inside each block
        d1 = tl.maximum(d1, tl.max(-b1, axis=0))
        d2 = tl.maximum(d2, tl.max(-b2, axis=0))
        d3 = tl.maximum(d3, tl.max(-b3, axis=0))
        el = tl.exp(gl)
        lq = q * el
        # gamma q = q exp(G), G the chunk-level cumsum: the in-block one plus the decays of the blocks before
        off = tl.where(blk == 0, 0.0, tl.where(blk == 1, b0[None, :], tl.where(blk == 2, (b0 + b1)[None, :],
                                                                                (b0 + b1 + b2)[None, :])))
        qrow = (row0 + r64).to(tl.int64)[:, None] * K + s0 + tl.arange(0, KS)[None, :]
        tl.store(qg_ptr + qrow, (lq * tl.exp(off)).to(qg_ptr.dtype.element_ty))
        lb = _rows(b_ptr, bi, hq, c0, T, HQ, K, 64, s0, KS) * k * el
        bsr = tl.where(blk == 0, b0[None, :], tl.where(blk == 1, b1[None, :], tl.where(blk == 2, b2[None, :],
                                                                                     b3[None, :])))
        kend = k * tl.exp(bsr - gl)                              # keys decayed to the end of their block
        # diagonal factor, clamped: a block past SAFE_DECAY must stay finite (zero rows times inf poison others)
        kdiag = k * tl.exp(tl.minimum(-gl, SAFE_DECAY))
        for I in tl.static_range(4):
            # columns of block J < I: from the end of J over the blocks between J and I
            if I == 0:
                kr = tl.where(blk == 0, kdiag, 0.0)
            elif I == 1:
                kr = tl.where(blk == 1, kdiag, tl.where(blk == 0, kend, 0.0))
            elif I == 2:
                kr = tl.where(blk == 2, kdiag, tl.where(blk == 1, kend, tl.where(blk == 0, kend * tl.exp(b1)[None, :],
                                                                                 0.0)))
            else:
                kr = tl.where(blk == 3, kdiag, tl.where(blk == 2, kend, tl.where(
                    blk == 1, kend * tl.exp(b2)[None, :], kend * tl.exp(b1 + b2)[None, :])))
            right = tl.trans(kr)
            tr = _dot(tl.where(blk == I, lb, 0.0), right, DOT, tr)
            ar = _dot(tl.where(blk == I, lq, 0.0), right, DOT, ar)
    nk = _inv_norm(ssk, L2NORM)
    nq = _inv_norm(ssq, L2NORM) * scale
    tl.store(norms_ptr + (row0 + r64).to(tl.int64) * 2, nk)
    tl.store(norms_ptr + (row0 + r64).to(tl.int64) * 2 + 1, nq)
    off = (row0 + r64).to(tl.int64)[:, None] * 64 + r64[None, :]
    tl.store(aqk_ptr + off, tl.where(r64[:, None] >= r64[None, :], ar * nq[:, None] * nk[None, :], 0.0)
             .to(aqk_ptr.dtype.element_ty))
    tl.store(ainv_ptr + off, tl.where(r64[:, None] > r64[None, :], tr * nk[:, None] * nk[None, :], 0.0))
    tl.debug_barrier()
    for i in range(4):  # a runtime loop: one copy of the rarely taken fallback
        decay = tl.where(i == 0, d0, tl.where(i == 1, d1, tl.where(i == 2, d2, d3)))
        if decay >= SAFE_DECAY:  # the factored diagonal block overflowed: exact pairwise exponents instead
            aq, tt = _diag(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, c0 + 16 * i, T, scale, HQ, K, L2NORM)
            _st16(aqk_ptr, row0 + 16 * i, 0, 16 * i, aq)
            _st16(ainv_ptr, row0 + 16 * i, 0, 16 * i, tt)
    tl.debug_barrier()
    t00 = _ld16(ainv_ptr, row0, 0, 0)
    t11 = _ld16(ainv_ptr, row0, 16, 16)
    t22 = _ld16(ainv_ptr, row0, 32, 32)
    t33 = _ld16(ainv_ptr, row0, 48, 48)
    t10 = _ld16(ainv_ptr, row0, 16, 0)
    t20 = _ld16(ainv_ptr, row0, 32, 0)
    t21 = _ld16(ainv_ptr, row0, 32, 16)
    t30 = _ld16(ainv_ptr, row0, 48, 0)
    t31 = _ld16(ainv_ptr, row0, 48, 16)
    t32 = _ld16(ainv_ptr, row0, 48, 32)
    tl.debug_barrier()                                      # every T block is read before A overwrites it

    # A = (I + T)^-1: invert the diagonal blocks, then A_IJ = -A_II sum_{J<=L<I} T_IL A_LJ (upper blocks stay 0)
    a00 = _inv16(t00)
    a11 = _inv16(t11)
    a22 = _inv16(t22)
    a33 = _inv16(t33)
    a10 = -_mm(a11, _mm(t10, a00))
    a21 = -_mm(a22, _mm(t21, a11))
    a20 = -_mm(a22, _mm(t20, a00) + _mm(t21, a10))
    a32 = -_mm(a33, _mm(t32, a22))
    a31 = -_mm(a33, _mm(t31, a11) + _mm(t32, a21))
    a30 = -_mm(a33, _mm(t30, a00) + _mm(t31, a10) + _mm(t32, a20))
    _st16(ainv_ptr, row0, 0, 0, a00)
    _st16(ainv_ptr, row0, 16, 0, a10)
    _st16(ainv_ptr, row0, 16, 16, a11)
    _st16(ainv_ptr, row0, 32, 0, a20)
    _st16(ainv_ptr, row0, 32, 16, a21)
    _st16(ainv_ptr, row0, 32, 32, a22)
    _st16(ainv_ptr, row0, 48, 0, a30)
    _st16(ainv_ptr, row0, 48, 16, a31)
    _st16(ainv_ptr, row0, 48, 32, a32)
    _st16(ainv_ptr, row0, 48, 48, a33)


@triton.jit
def _wy_kernel(
    k_ptr, g_ptr, b_ptr, v_ptr, w_ptr, ainv_ptr, norms_ptr, y_ptr, ylo_ptr, u_ptr, kt_ptr, ktlo_ptr, gc_ptr, T, Tp,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, DOT: tl.constexpr, SPLIT_Y: tl.constexpr,
    SPLIT_KT: tl.constexpr, KC: tl.constexpr,
):
    """Y = A E, U = A Z, Ktail, gamma_C for one chunk of one q/k head (all its value heads' U).

    The row norms come from the score kernel; everything else is per key column (cumsum included) or value
    column, so it runs in KC-column slices to keep the [64, K] fp32 tiles from spilling. SPLIT_Y / SPLIT_KT
    store Y / Ktail as bf16 hi + lo pairs, so the sequential kernel feeds them to its split products as loaded.
    """
    n = tl.program_id(0)
    bq = tl.program_id(1)
    bi = bq // HQ
    hq = bq % HQ
    c0 = n * 64
    r64 = tl.arange(0, 64)
    rows = (bq * Tp + c0 + r64).to(tl.int64)
    a = tl.load(ainv_ptr + rows[:, None] * 64 + r64[None, :])
    if DOT == "bf16x3":  # split A once for all its products
        ah, al = _split(a)
    else:
        ah, al = a, a
    nk = tl.load(norms_ptr + rows * 2)
    for s0 in tl.static_range(0, K, KC):
        oc = s0 + tl.arange(0, KC)
        off = rows[:, None] * K + oc[None, :]
        G = tl.cumsum(_rows(g_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC), axis=0)
        gam = tl.exp(G)
        k = _rows(k_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC) * nk[:, None]
        e = gam * _rows(b_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC) * k
        _store_op(y_ptr, ylo_ptr, off, _dot_a(a, ah, al, e, DOT), SPLIT_Y)
        glast = tl.sum(tl.where((r64 == 63)[:, None], G, 0.0), axis=0)
        _store_op(kt_ptr, ktlo_ptr, off, k * tl.exp(glast[None, :] - G), SPLIT_KT)
        tl.store(gc_ptr + (bq * (Tp // 64) + n).to(tl.int64) * K + oc, tl.exp(glast))
    VC: tl.constexpr = KC if KC < V else V
    for j in range(HV // HQ):                              # GVA: value heads hq*G .. hq*G+G-1 share A
        hv = hq * (HV // HQ) + j
        vrows = ((bi * HV + hv) * Tp + c0 + r64).to(tl.int64)
        for s0 in tl.static_range(0, V, VC):
            z = _rows(v_ptr, bi, hv, c0, T, HV, V, 64, s0, VC) * _rows(w_ptr, bi, hv, c0, T, HV, V, 64, s0, VC)
            ov = s0 + tl.arange(0, VC)
            u = _dot_a(a, ah, al, z, DOT)
            tl.store(u_ptr + vrows[:, None] * V + ov[None, :], u.to(u_ptr.dtype.element_ty))


@triton.jit
def _state_kernel(
    y_ptr, ylo_ptr, u_ptr, kt_ptr, ktlo_ptr, gc_ptr, hs_ptr, vn_ptr, fin_ptr, codes_ptr, scales_ptr, slots_ptr, N,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    INIT: tl.constexpr, MODE: tl.constexpr, ROW: tl.constexpr, READ: tl.constexpr, WRITE: tl.constexpr,
):
    """The sequential pass: only R = U - Y S and S <- gamma_C S + Ktail^T R on the chain from chunk to chunk.

    Loads of the next chunk's Y, U, Ktail do not depend on S, so num_stages > 1 prefetches them. A "bf16x3"
    product (READ for Y S, WRITE for Ktail^T R) gets Y / Ktail as hi + lo pairs and splits only S / R here. R
    keeps fp32 for the state update; the chunk start states and R are stored for the output kernel in its
    operand dtype.
    """
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    bi, hv, bq = _value_head(bh, HQ, HV)
    ok = tl.arange(0, K)
    ov = pv * BV + tl.arange(0, BV)
    r64 = tl.arange(0, 64)
    if INIT:  # a padding sequence (slot < 0) starts from slot 0, as the reference does
        head = tl.maximum(tl.load(slots_ptr + bi), 0).to(tl.int64) * HV + hv
        c, sc = load_codes(codes_ptr + head * (K * V) + pv * BV, scales_ptr + head * (K if ROW else 1),
                           ok[:, None] * V + tl.arange(0, BV)[None, :], ok, MODE, ROW)
        s = c * sc[:, None]
    else:
        s = tl.zeros([K, BV], dtype=tl.float32)
    hs_off = ok.to(tl.int64)[:, None] * V + ov[None, :]
    for n in range(N):
        qoff = (bq * N * 64 + n * 64 + r64).to(tl.int64)[:, None] * K + ok[None, :]
        voff = (bh * N * 64 + n * 64 + r64).to(tl.int64)[:, None] * V + ov[None, :]
        tl.store(hs_ptr + (bh * N + n).to(tl.int64) * (K * V) + hs_off, s.to(hs_ptr.dtype.element_ty))
        u = tl.load(u_ptr + voff).to(tl.float32)
        gc = tl.load(gc_ptr + (bq * N + n).to(tl.int64) * K + ok)
        if READ == "bf16x3":  # Y comes as a hi + lo pair (LaunchPlan.y_split)
            sh, sl = _split(s)
            r = u - _dot3(tl.load(y_ptr + qoff), tl.load(ylo_ptr + qoff), sh, sl)   # residual after the erase
        else:
            r = u - _dot(tl.load(y_ptr + qoff), s, READ)
        if WRITE == "bf16x3":  # Ktail comes as a hi + lo pair (LaunchPlan.kt_split)
            rh, rl = _split(r)
            s = _dot3(tl.trans(tl.load(kt_ptr + qoff)), tl.trans(tl.load(ktlo_ptr + qoff)), rh, rl,
                      s * gc[:, None])
        else:
            s = _dot(tl.trans(tl.load(kt_ptr + qoff)), r, WRITE, s * gc[:, None])
        tl.store(vn_ptr + voff, r.to(vn_ptr.dtype.element_ty))
    tl.store(fin_ptr + bh.to(tl.int64) * (K * V) + hs_off, s)


@triton.jit
def _output_kernel(
    aqk_ptr, qg_ptr, norms_ptr, hs_ptr, vn_ptr, o_ptr, T, N,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr,
):
    """O = (gamma q) S_chunk + Aqk R for one chunk and V block: independent of every other chunk."""
    n = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2)
    bi, hv, bq = _value_head(bh, HQ, HV)
    ok = tl.arange(0, K)
    ov = pv * BV + tl.arange(0, BV)
    r64 = tl.arange(0, 64)
    qrows = (bq * N * 64 + n * 64 + r64).to(tl.int64)
    vrows = (bh * N * 64 + n * 64 + r64).to(tl.int64)
    qg = tl.load(qg_ptr + qrows[:, None] * K + ok[None, :])
    h = tl.load(hs_ptr + (bh * N + n).to(tl.int64) * (K * V) + ok[:, None] * V + ov[None, :])
    a = tl.load(aqk_ptr + qrows[:, None] * 64 + r64[None, :])
    r = tl.load(vn_ptr + vrows[:, None] * V + ov[None, :])
    nq = tl.load(norms_ptr + qrows * 2 + 1)                # gamma q comes unnormalised (score kernel)
    o = _dot(a, r, DOT, _dot(qg, h, DOT) * nq[:, None])
    t = n * 64 + r64
    o_off = ((bi * T + t) * HV + hv).to(tl.int64)[:, None] * V + ov[None, :]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=(t < T)[:, None])


@triton.jit
def _store_kernel(
    fin_ptr, codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, INIT: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
):
    bh = tl.program_id(0)
    bi = bh // HV
    hv = bh % HV
    slot = tl.load(slots_ptr + bi).to(tl.int64)
    if slot >= 0:  # a padding sequence stores nothing
        head = slot * HV + hv
        ok = tl.arange(0, K)
        offs = ok[:, None] * V + tl.arange(0, V)[None, :]
        x = tl.load(fin_ptr + bh.to(tl.int64) * (K * V) + offs)
        tile = head * (K * V)
        srow = head * (K if ROW else 1)
        if INIT:
            _, sc_prev = load_codes(codes_ptr + tile, scales_ptr + srow, offs, ok, MODE, ROW)
            store_state(x, sc_prev, codes_ptr + tile, scales_ptr + srow, res_ptr + tile,
                        static_ptr + hv * (K if ROW else 1), offs, ok, tl.load(seed_ptr), bh * (K * V),
                        MODE, ROW, ROUND, STATIC)
        else:  # a fresh sequence has no residual to feed back
            store_state(x, tl.zeros([K], dtype=tl.float32), codes_ptr + tile, scales_ptr + srow,
                        res_ptr + tile, static_ptr + hv * (K if ROW else 1), offs, ok, tl.load(seed_ptr),
                        bh * (K * V), MODE, ROW, 0 if ROUND == 2 else ROUND, STATIC)


class LaunchPlan(NamedTuple):
    """The product precision of each launch for one dot_precision (see :func:`prefill_triton`)."""

    score: str   # score kernel: T and Aqk blocks (the 16x16 inverse is always fp32 FMA)
    wy: str      # Y = A E, U = A Z
    read: str    # R = U - Y S (the erase read of the sequential pass)
    write: str   # S <- gamma_C S + Ktail^T R (its state update)
    out: str     # O = (gamma q) S_chunk + Aqk R

    @property
    def out_dtype(self) -> torch.dtype:
        """Aqk, gamma q, chunk start states and R: read by the output kernel only."""
        return torch.bfloat16 if self.out == "bf16" else torch.float32

    @property
    def y_dtype(self) -> torch.dtype:
        """Y, stored in the operand dtype of the read product (bf16, hi + lo pairs when split, else fp32)."""
        return _operand_dtype(self.read)

    @property
    def kt_dtype(self) -> torch.dtype:
        """Ktail, stored in the operand dtype of the write product."""
        return _operand_dtype(self.write)

    @property
    def u_dtype(self) -> torch.dtype:
        """U is bf16 only when both state products are: R = U - Y S feeds the write product."""
        return torch.bfloat16 if self.read == self.write == "bf16" else torch.float32

    @property
    def y_split(self) -> bool:
        return self.read == "bf16x3"

    @property
    def kt_split(self) -> bool:
        return self.write == "bf16x3"

    @property
    def y_planes(self) -> int:
        """Stored planes of Y: hi and lo when split, else one."""
        return 2 if self.y_split else 1

    @property
    def kt_planes(self) -> int:
        return 2 if self.kt_split else 1

    @property
    def wy_block_k(self) -> int:
        """Key columns per slice of the WY kernel: 128 where its products take bf16 operand pairs (H200, "mixed",
        1x8192: 156 µs against 164 at 64), 64 where they take fp32 operands, whose tiles need more registers
        (the width those plans were timed at; at 128 the 1x8192 rows of "bf16", "bf16x3" and "tf32x3" took
        5-15% longer in the same table)."""
        return 128 if self.wy == "bf16x3" else 64


def _operand_dtype(prec: str) -> torch.dtype:
    return torch.bfloat16 if prec in ("bf16", "bf16x3") else torch.float32


_PLANS = {
    "bf16": LaunchPlan("tf32", "tf32", "bf16", "bf16", "bf16"),
    "mixed": LaunchPlan("bf16", "bf16x3", "bf16", "bf16x3", "bf16"),
    "mixed-split": LaunchPlan("tf32", "bf16x3", "bf16x3", "bf16x3", "bf16"),
    "bf16x3": LaunchPlan("tf32x3", "tf32x3", "bf16x3", "bf16x3", "bf16x3"),
    **{p: LaunchPlan(p, p, p, p, p) for p in ("tf32", "tf32x3", "ieee")},
}
DOT_PRECISIONS = tuple(_PLANS)


def default_dot(dtype: torch.dtype) -> str:
    """The default dot_precision: "mixed" for bf16 inputs (fast, an int8 S_T within 0.55 steps of the exact
    one), else tf32x3."""
    return "mixed" if dtype == torch.bfloat16 else "tf32x3"


def launch_plan(dot: str) -> LaunchPlan:
    if dot not in _PLANS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot!r}")
    return _PLANS[dot]


def state_block_v(heads: int, V: int, sms: int) -> int:
    """Value columns per program of the sequential pass for ``heads`` (sequence, value head) pairs.

    The pass is a chain of small products per chunk, latency-bound: narrow blocks shorten each link, but a
    program takes a whole multiprocessor's shared memory at 3 stages, so programs past the SM count run in
    another wave. H200, 16 heads: 1x8192 at 16 columns (128 programs) 221 µs, at 32 260 µs; 4x8192 at 16
    columns (512 programs) 860 µs, at 32 559 µs, at 64 (128 programs) 416 µs.
    """
    for bv in (16, 32):
        if heads * triton.cdiv(V, bv) <= sms:
            return bv
    return 64


SHARED_BYTES = 232448         # shared memory per block on sm_90 (227 KiB)


def state_stages(plan: LaunchPlan, K: int, BV: int) -> int:
    """Pipeline stages of the sequential pass: the most, up to 3, that fit in shared memory (at least 1).

    Each stage holds one chunk's Y, Ktail (hi + lo pairs when split) and U block. The rest is layout-conversion
    scratch, bounded here by 32 KiB or an fp32 [K, BV] tile, whichever is larger. With the stages this picks,
    sm_90 compiles of every plan at K = V = 128 and 256 and BV = 16-128 fit, except "tf32x3" at K = 256 with
    BV = 128 (262,144 bytes even at one stage; tools/prefill_sass.py prints what a launch asks for). At 1x8192
    three stages took the pass from 281 to 221 µs (4: 223); fp32 operands at 32 value columns need 245,760
    bytes at three.
    """
    stage = CHUNK * K * (plan.y_dtype.itemsize * plan.y_planes + plan.kt_dtype.itemsize * plan.kt_planes)
    stage += CHUNK * BV * plan.u_dtype.itemsize
    scratch = max(32768, 4 * K * BV)
    return next((n for n in (3, 2) if n * stage + scratch <= SHARED_BYTES), 1)


def prefill_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, initial: bool = True,
    scale: float | None = None, use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, dot_precision: str | None = None,
    block_v: int | None = None, state_warps: int = 4, stages: int | None = None, intra_warps: int = 4,
    out_block_v: int = 64,
    wy_block_k: int | None = None, score_block_k: int = 128,
) -> torch.Tensor:
    """Launch the prefill kernels. q, k, g, b: [B, T, HQ, K]; v, w: [B, T, HV, V]; returns o.

    dot_precision (default "mixed" for bf16 inputs, else "tf32x3"), per launch as :class:`LaunchPlan`:
    - "mixed": bf16 products where their rounding stays out of S_T or moves it little: the score kernel (T and
      Aqk), the erase read Y S of the sequential pass (Y stored bf16) and the output kernel (bf16 Aqk, gamma q,
      chunk states, R); split bf16 hi + lo products where it does not: Y = A E, U = A Z and the state update
      Ktail^T R (Ktail stored as hi + lo, U fp32, R kept fp32). tools/prefill_precision.py's float64 emulation
      says which products carry the error. H200, 1x8192 (tools/gpu_check_kernels.py): the int8 S_T 0.54 steps
      from the exact state (0.51 with every state product split, 1.17 for "bf16").
    - "mixed-split": "mixed" with tf32 scores and the erase read split too (the default before it; H200 1x8192:
      0.51 steps, 912 µs with the launch of that time against 704 µs for "mixed"). Its fp32 S_T stays closer to
      exact where decays are slow (float64 emulation, 1x8192, channels remembering ~1000 tokens: 1.6e-4
      relative against 9.9e-4 for "mixed", at the 1e-3 limit of an fp32 state).
    - "bf16": fla's choice, bf16 operands and intermediates everywhere after the score/WY kernels (tf32): the
      rounding of Ktail, U, R and the update product puts the int8 S_T 1.17 steps from the exact state.
    - "bf16x3": split products everywhere (tf32x3 in the score/WY kernels) and fp32 intermediates (Y and Ktail
      as hi + lo pairs); "tf32x3" kept the fp32 state within ~1e-6 of the reference (H200), the default for
      fp32 inputs; "tf32" drifted ~2e-3 over 1000 tokens; "ieee" is fp32 FMA.
    block_v / state_warps / stages shape the sequential kernel (by default block_v from :func:`state_block_v`,
    the narrowest value block that keeps one wave of programs, and stages from :func:`state_stages`),
    intra_warps and wy_block_k (key columns per slice) the WY kernel, score_block_k the score kernel's slices,
    out_block_v the output kernel (benchmark sweeps); wy_block_k defaults to :attr:`LaunchPlan.wy_block_k`. H200,
    1x8192, "mixed": WY slices of 128 key columns 156 µs (64: 164, 32: 188; 8 warps 264), score slices of 128
    244 µs (64: 268). The score kernel always runs 4 warps: at 8 (with block_v 64 and out_block_v 128) the H200
    check returned NaN outputs where the CPU interpreter (which has no warps) agreed with the reference, so its
    scratch hand-off between warps is only trusted at 4.
    """
    B, T, HQ, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    plan = launch_plan(dot_precision or default_dot(q.dtype))
    wy_block_k = plan.wy_block_k if wy_block_k is None else wy_block_k
    for name, n in (("wy_block_k", wy_block_k), ("score_block_k", score_block_k)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"prefill {name}={n}: key columns per slice must be a power of two >= 16, e.g. 64")
    q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
    N = triton.cdiv(T, CHUNK)
    Tp = N * CHUNK
    BV, BVO = min(block_v or state_block_v(B * HV, V, sm_count(q.device)), V), min(out_block_v, V)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    op = dict(dtype=plan.out_dtype, device=dev)
    aqk = torch.empty(B * HQ, Tp, CHUNK, **op)
    ainv = torch.empty(B * HQ, Tp, CHUNK, **f32)
    y = torch.empty(plan.y_planes, B * HQ, Tp, K, dtype=plan.y_dtype, device=dev)
    kt = torch.empty(plan.kt_planes, B * HQ, Tp, K, dtype=plan.kt_dtype, device=dev)
    qg = torch.empty(B * HQ, Tp, K, **op)
    gc = torch.empty(B * HQ, N, K, **f32)
    u = torch.empty(B * HV, Tp, V, dtype=plan.u_dtype, device=dev)
    vn = torch.empty(B * HV, Tp, V, **op)
    hs = torch.empty(B * HV, N, K, V, **op)
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev) if out is None else out
    fin = torch.empty(B * HV, K, V, **f32)
    sc = float(K ** -0.5 if scale is None else scale)
    norms = torch.empty(B * HQ, Tp, 2, **f32)
    _score_kernel[(N, B * HQ)](q, k, g, b, aqk, ainv, norms, qg, T, Tp, sc, HQ=HQ, K=K, L2NORM=use_qk_l2norm,
                               DOT=plan.score, KS=min(K, score_block_k), num_warps=4)
    _wy_kernel[(N, B * HQ)](k, g, b, v, w, ainv, norms, y[0], y[-1], u, kt[0], kt[-1], gc, T, Tp, HQ=HQ,
                            HV=HV, K=K, V=V, DOT=plan.wy, SPLIT_Y=plan.y_split, SPLIT_KT=plan.kt_split,
                            KC=min(K, wy_block_k), num_warps=intra_warps)
    cx = format_constexprs(fmt)
    dummy = pool.codes
    scales = pool.scales if pool.scales is not None else dummy
    res = pool.residual if pool.residual is not None else dummy
    _state_kernel[(V // BV, B * HV)](
        y[0], y[-1], u, kt[0], kt[-1], gc, hs, vn, fin, pool.codes, scales, slots, N, HQ=HQ, HV=HV, K=K, V=V, BV=BV,
        INIT=initial, MODE=cx["MODE"], ROW=cx["ROW"], READ=plan.read, WRITE=plan.write, num_warps=state_warps,
        num_stages=stages or state_stages(plan, K, BV))
    _output_kernel[(N, V // BVO, B * HV)](aqk, qg, norms, hs, vn, o, T, N, HQ=HQ, HV=HV, K=K, V=V, BV=BVO, DOT=plan.out,
                                          num_warps=4)
    stat = effective_static_scales(fmt, static_scales, HV, K, dev)
    _store_kernel[(B * HV,)](fin, pool.codes, scales, res, stat, slots, seed_tensor(fmt, seed, dev), HV=HV, K=K,
                             V=V, INIT=initial, num_warps=4, **cx)
    return o
