"""Chunked (WY form, chunk 64) Triton prefill that starts from a stored state and leaves S_T stored.

Five launches (GDN2_SPEC.md 2), shaped like fla's chunk_gdn2 so that only the state recurrence is sequential:
1. ``_score_kernel``, one program per (chunk, sequence x q/k head), all chunks in parallel: decayed score
   matrices Aqk and T in 16x16 blocks (diagonal blocks with exact pairwise exponents, off-diagonal blocks as
   dot products of factors decayed to the end of the earlier block, so no exponential exceeds 1) and the
   inverse A = (I + T)^-1 by the exact product formula on the diagonal blocks and block merging.
2. ``_wy_kernel``, same grid: Y = A E, U = A Z (for every value head of the q/k head), the decayed queries
   (gamma q), tail keys (gamma_C / gamma k) and total decay gamma_C, in K slices to bound registers.
3. ``_state_kernel``, one program per (V block, sequence x value head), sequential over chunks with two
   matrix products per chunk: R = U - Y S, S <- gamma_C S + Ktail^T R. It stores every chunk's start state
   and R for step 4, and the fp32 S_T.
4. ``_output_kernel``, one program per (chunk, V block, sequence x value head), in parallel:
   O = (gamma q) S_chunk + Aqk R (the output product is off the sequential path).
5. ``_store_kernel``: stores S_T into the pool slot in its format (same rounding code as the decode step).
Products run with bf16 operands (fp32 accumulation, as fla) for bf16 inputs, or with fp32 operands split into
bf16 hi + lo ("bf16x3") or in tf32x3 ("tf32", "ieee") precision: the inter-kernel tensors Y, U, Aqk, gamma q,
Ktail, chunk states and R are stored in bf16 or fp32 accordingly; the carried state is always fp32.
Head dims K, V must be powers of two (16..256); T is arbitrary (the last chunk is zero-padded: padded rows of
Y, U, Ktail are zero, so they leave S unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2q.kernels.decode import effective_static_scales, seed_tensor
from gdn2q.kernels.state_io import INTERPRETED, format_constexprs, load_codes, store_state
from gdn2q.quant.state import QuantizedState, StateQuantConfig

CHUNK = 64
SAFE_DECAY: tl.constexpr = tl.constexpr(60.0)


@triton.jit
def _rows(ptr, bi, h, t0, T, H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, c0: tl.constexpr,
          C: tl.constexpr):
    """Rows t0..t0+R, columns c0..c0+C of head h of a [B, T, H, D] tensor, as fp32 (0 past T)."""
    r = t0 + tl.arange(0, R)
    off = ((bi * T + r) * H + h).to(tl.int64)[:, None] * D + (c0 + tl.arange(0, C))[None, :]
    return tl.load(ptr + off, mask=(r < T)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _inv_norm(x, ON: tl.constexpr):
    """Per-row 1 / sqrt(sum(x^2) + 1e-6) (the upstream L2 norm), or 1."""
    if ON:
        n = tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)
    else:
        n = tl.full([x.shape[0]], 1.0, dtype=tl.float32)
    return n


@triton.jit
def _diag(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, t0, T, nq, nk, HQ: tl.constexpr, K: tl.constexpr,
          KS: tl.constexpr):
    """Diagonal 16x16 blocks of Aqk (j <= i) and T (j < i) with exact exponents gl_i - gl_j <= 0.

    Computed as [16, 16, KS] products over K in slices of KS columns; nq, nk are the rows' norm factors.
    """
    i16 = tl.arange(0, 16)
    causal = (i16[:, None] >= i16[None, :])[:, :, None]
    aq = tl.zeros([16, 16], dtype=tl.float32)
    tt = tl.zeros([16, 16], dtype=tl.float32)
    for c0 in tl.static_range(0, K, KS):
        q = _rows(q_ptr, bi, hq, t0, T, HQ, K, 16, c0, KS) * nq[:, None]
        k = _rows(k_ptr, bi, hq, t0, T, HQ, K, 16, c0, KS) * nk[:, None]
        bk = _rows(b_ptr, bi, hq, t0, T, HQ, K, 16, c0, KS) * k
        gl = tl.cumsum(_rows(g_ptr, bi, hq, t0, T, HQ, K, 16, c0, KS), axis=0)
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
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation. "bf16": bf16 operands on the tensor cores (fla's choice); "bf16x3": fp32
    operands split into bf16 hi + lo, three bf16 products (~2^-16 relative, tf32 tensor-core rate is half of
    bf16's); else fp32 operands with that input precision ("tf32", "tf32x3", "ieee")."""
    if (DOT == "bf16" or DOT == "bf16x3") and INTERPRETED:  # the CPU interpreter's bf16 dot is wrong
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == "bf16":
        c = tl.dot(a, b)
    elif DOT == "bf16x3":
        ah, al = _split(a)
        bh, bl = _split(b)
        c = tl.dot(ah, bh, acc=tl.dot(al, bh, acc=tl.dot(ah, bl)))
    else:
        c = tl.dot(a, b, input_precision=DOT)
    return c


@triton.jit
def _st16(ptr, base_row, r0: tl.constexpr, c0: tl.constexpr, x):
    i16 = tl.arange(0, 16)
    tl.store(ptr + (base_row + r0 + i16).to(tl.int64)[:, None] * 64 + c0 + i16[None, :],
             x.to(ptr.dtype.element_ty))


@triton.jit
def _upper_zero(ptr, row0, zero):
    """Zero the six 16x16 blocks above the diagonal of a 64x64 chunk matrix."""
    _st16(ptr, row0, 0, 16, zero)
    _st16(ptr, row0, 0, 32, zero)
    _st16(ptr, row0, 0, 48, zero)
    _st16(ptr, row0, 16, 32, zero)
    _st16(ptr, row0, 16, 48, zero)
    _st16(ptr, row0, 32, 48, zero)


@triton.jit
def _block(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, t0, T, scale, HQ: tl.constexpr, K: tl.constexpr,
           L2NORM: tl.constexpr, KS: tl.constexpr, DOT: tl.constexpr):
    """One 16-token block: q (scaled), k, b*k, local cumulative decay gl, block decay sum, diagonal blocks.

    The diagonal blocks use one matrix product when no channel decays by more than SAFE_DECAY nats inside
    the block, else exact pairwise exponents.
    """
    q = _rows(q_ptr, bi, hq, t0, T, HQ, K, 16, 0, K)
    k = _rows(k_ptr, bi, hq, t0, T, HQ, K, 16, 0, K)
    nq = _inv_norm(q, L2NORM) * scale
    nk = _inv_norm(k, L2NORM)
    q = q * nq[:, None]
    k = k * nk[:, None]
    g = _rows(g_ptr, bi, hq, t0, T, HQ, K, 16, 0, K)
    bk = _rows(b_ptr, bi, hq, t0, T, HQ, K, 16, 0, K) * k
    gl = tl.cumsum(g, axis=0)
    bs = tl.sum(g, axis=0)
    if tl.max(-bs, axis=0) < SAFE_DECAY:  # factors exp(gl) >= e^-60 and exp(-gl) <= e^60: exact as products
        e = tl.exp(gl)
        kinv = k * tl.exp(-gl)
        i16 = tl.arange(0, 16)
        aq = tl.where(i16[:, None] >= i16[None, :], tl.dot(q * e, tl.trans(kinv), input_precision=DOT), 0.0)
        tt = tl.where(i16[:, None] > i16[None, :], tl.dot(bk * e, tl.trans(kinv), input_precision=DOT), 0.0)
    else:
        aq, tt = _diag(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, t0, T, nq, nk, HQ, K, KS)
    return q, k, bk, gl, bs, aq, tt


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, g_ptr, b_ptr, aqk_ptr, ainv_ptr, T, Tp, scale,
    HQ: tl.constexpr, K: tl.constexpr, L2NORM: tl.constexpr, DOT: tl.constexpr, KS: tl.constexpr,
):
    n = tl.program_id(0)
    bq = tl.program_id(1)
    bi = bq // HQ
    hq = bq % HQ
    c0 = n * 64
    row0 = bq * Tp + c0
    zero = tl.zeros([16, 16], dtype=tl.float32)

    q, k, bk, gl, bs0, aq, t00 = _block(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, c0, T, scale, HQ, K, L2NORM,
                                      KS, DOT)
    _st16(aqk_ptr, row0, 0, 0, aq)
    kr0 = k * tl.exp(bs0[None, :] - gl)                    # keys decayed to the end of block 0

    q, k, bk, gl, bs1, aq, t11 = _block(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, c0 + 16, T, scale, HQ, K, L2NORM,
                                      KS, DOT)
    _st16(aqk_ptr, row0, 16, 16, aq)
    e = tl.exp(gl)                                          # decay from the start of block 1
    t10 = tl.dot(bk * e, tl.trans(kr0), input_precision=DOT)
    _st16(aqk_ptr, row0, 16, 0, tl.dot(q * e, tl.trans(kr0), input_precision=DOT))
    kr1 = k * tl.exp(bs1[None, :] - gl)

    q, k, bk, gl, bs2, aq, t22 = _block(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, c0 + 32, T, scale, HQ, K, L2NORM,
                                      KS, DOT)
    _st16(aqk_ptr, row0, 32, 32, aq)
    e = tl.exp(gl)
    d = tl.exp(bs1)[None, :]                                # end of block 0 -> start of block 2
    t20 = tl.dot(bk * e * d, tl.trans(kr0), input_precision=DOT)
    _st16(aqk_ptr, row0, 32, 0, tl.dot(q * e * d, tl.trans(kr0), input_precision=DOT))
    t21 = tl.dot(bk * e, tl.trans(kr1), input_precision=DOT)
    _st16(aqk_ptr, row0, 32, 16, tl.dot(q * e, tl.trans(kr1), input_precision=DOT))
    kr2 = k * tl.exp(bs2[None, :] - gl)

    q, k, bk, gl, bs3, aq, t33 = _block(q_ptr, k_ptr, g_ptr, b_ptr, bi, hq, c0 + 48, T, scale, HQ, K, L2NORM,
                                      KS, DOT)
    _st16(aqk_ptr, row0, 48, 48, aq)
    e = tl.exp(gl)
    d = tl.exp(bs1 + bs2)[None, :]
    t30 = tl.dot(bk * e * d, tl.trans(kr0), input_precision=DOT)
    _st16(aqk_ptr, row0, 48, 0, tl.dot(q * e * d, tl.trans(kr0), input_precision=DOT))
    d = tl.exp(bs2)[None, :]
    t31 = tl.dot(bk * e * d, tl.trans(kr1), input_precision=DOT)
    _st16(aqk_ptr, row0, 48, 16, tl.dot(q * e * d, tl.trans(kr1), input_precision=DOT))
    t32 = tl.dot(bk * e, tl.trans(kr2), input_precision=DOT)
    _st16(aqk_ptr, row0, 48, 32, tl.dot(q * e, tl.trans(kr2), input_precision=DOT))
    _upper_zero(aqk_ptr, row0, zero)

    # A = (I + T)^-1: invert the diagonal blocks, then A_IJ = -A_II sum_{J<=L<I} T_IL A_LJ
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
    _upper_zero(ainv_ptr, row0, zero)


@triton.jit
def _wy_kernel(
    q_ptr, k_ptr, g_ptr, b_ptr, v_ptr, w_ptr, ainv_ptr, y_ptr, u_ptr, qg_ptr, kt_ptr, gc_ptr, T, Tp, scale,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L2NORM: tl.constexpr,
    DOT: tl.constexpr, KC: tl.constexpr,
):
    """Y = A E, U = A Z, gamma q, Ktail, gamma_C for one chunk of one q/k head (all its value heads' U).

    The row norms need whole rows; everything else is per key column (cumsum included), so it runs in KC-column
    slices to keep the [64, K] fp32 tiles from spilling.
    """
    n = tl.program_id(0)
    bq = tl.program_id(1)
    bi = bq // HQ
    hq = bq % HQ
    c0 = n * 64
    r64 = tl.arange(0, 64)
    rows = (bq * Tp + c0 + r64).to(tl.int64)
    a = tl.load(ainv_ptr + rows[:, None] * 64 + r64[None, :])
    nk = _inv_norm(_rows(k_ptr, bi, hq, c0, T, HQ, K, 64, 0, K), L2NORM)
    nq = _inv_norm(_rows(q_ptr, bi, hq, c0, T, HQ, K, 64, 0, K), L2NORM) * scale
    for s0 in tl.static_range(0, K, KC):
        oc = s0 + tl.arange(0, KC)
        G = tl.cumsum(_rows(g_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC), axis=0)
        gam = tl.exp(G)
        k = _rows(k_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC) * nk[:, None]
        e = gam * _rows(b_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC) * k
        tl.store(y_ptr + rows[:, None] * K + oc[None, :], tl.dot(a, e, input_precision=DOT).to(y_ptr.dtype.element_ty))
        glast = tl.sum(tl.where((r64 == 63)[:, None], G, 0.0), axis=0)
        tl.store(kt_ptr + rows[:, None] * K + oc[None, :], (k * tl.exp(glast[None, :] - G)).to(kt_ptr.dtype.element_ty))
        tl.store(gc_ptr + (bq * (Tp // 64) + n).to(tl.int64) * K + oc, tl.exp(glast))
        q = _rows(q_ptr, bi, hq, c0, T, HQ, K, 64, s0, KC) * nq[:, None]
        tl.store(qg_ptr + rows[:, None] * K + oc[None, :], (q * gam).to(qg_ptr.dtype.element_ty))
    ov = tl.arange(0, V)
    for j in range(HV // HQ):                              # GVA: value heads hq*G .. hq*G+G-1 share A
        hv = hq * (HV // HQ) + j
        z = _rows(v_ptr, bi, hv, c0, T, HV, V, 64, 0, V) * _rows(w_ptr, bi, hv, c0, T, HV, V, 64, 0, V)
        vrows = ((bi * HV + hv) * Tp + c0 + r64).to(tl.int64)
        tl.store(u_ptr + vrows[:, None] * V + ov[None, :], tl.dot(a, z, input_precision=DOT).to(u_ptr.dtype.element_ty))


@triton.jit
def _state_kernel(
    y_ptr, u_ptr, kt_ptr, gc_ptr, hs_ptr, vn_ptr, fin_ptr, codes_ptr, scales_ptr, slots_ptr, N,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    INIT: tl.constexpr, MODE: tl.constexpr, ROW: tl.constexpr, DOT: tl.constexpr,
):
    """The sequential pass: only R = U - Y S and S <- gamma_C S + Ktail^T R on the chain from chunk to chunk.

    Loads of the next chunk's Y, U, Ktail do not depend on S, so num_stages > 1 prefetches them.
    """
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // HV
    hv = bh % HV
    bq = bi * HQ + hv // (HV // HQ)
    OP = y_ptr.dtype.element_ty
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
        qrows = (bq * N * 64 + n * 64 + r64).to(tl.int64)
        vrows = (bh * N * 64 + n * 64 + r64).to(tl.int64)
        tl.store(hs_ptr + (bh * N + n).to(tl.int64) * (K * V) + hs_off, s.to(OP))
        y = tl.load(y_ptr + qrows[:, None] * K + ok[None, :])
        u = tl.load(u_ptr + vrows[:, None] * V + ov[None, :]).to(tl.float32)
        r = (u - _dot(y, s.to(OP), DOT)).to(OP)                 # residual write after the erase
        tl.store(vn_ptr + vrows[:, None] * V + ov[None, :], r)
        kt = tl.load(kt_ptr + qrows[:, None] * K + ok[None, :])
        gc = tl.load(gc_ptr + (bq * N + n).to(tl.int64) * K + ok)
        s = s * gc[:, None] + _dot(tl.trans(kt), r, DOT)
    tl.store(fin_ptr + bh.to(tl.int64) * (K * V) + hs_off, s)


@triton.jit
def _output_kernel(
    aqk_ptr, qg_ptr, hs_ptr, vn_ptr, o_ptr, T, N,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr,
):
    """O = (gamma q) S_chunk + Aqk R for one chunk and V block: independent of every other chunk."""
    n = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2)
    bi = bh // HV
    hv = bh % HV
    bq = bi * HQ + hv // (HV // HQ)
    ok = tl.arange(0, K)
    ov = pv * BV + tl.arange(0, BV)
    r64 = tl.arange(0, 64)
    qrows = (bq * N * 64 + n * 64 + r64).to(tl.int64)
    vrows = (bh * N * 64 + n * 64 + r64).to(tl.int64)
    qg = tl.load(qg_ptr + qrows[:, None] * K + ok[None, :])
    h = tl.load(hs_ptr + (bh * N + n).to(tl.int64) * (K * V) + ok[:, None] * V + ov[None, :])
    a = tl.load(aqk_ptr + qrows[:, None] * 64 + r64[None, :])
    r = tl.load(vn_ptr + vrows[:, None] * V + ov[None, :])
    o = _dot(qg, h, DOT) + _dot(a, r, DOT)
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


DOT_PRECISIONS = ("bf16", "bf16x3", "tf32", "tf32x3", "ieee")


def prefill_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, initial: bool = True,
    scale: float | None = None, use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, dot_precision: str | None = None,
    block_v: int = 32, state_warps: int = 4, stages: int = 2, intra_warps: int = 4, out_block_v: int = 64,
) -> torch.Tensor:
    """Launch the prefill kernels. q, k, g, b: [B, T, HQ, K]; v, w: [B, T, HV, V]; returns o.

    dot_precision (default "tf32x3"): the operands of the sequential and output products. "tf32x3" is the
    default because it is the one that keeps an int8 final state within one step of the reference at 1x8192
    (H200: 1.00002 steps; "bf16x3" 1.0003, "bf16" 1.47 steps, docs/benchmarks/kernels-check-NVIDIA-H200.json).
    "bf16" is fla's choice (fp32 state, bf16 operands and bf16 intermediates; the score/WY kernels
    then multiply in tf32); "bf16x3" keeps fp32 intermediates and splits each operand into bf16 hi + lo;
    "tf32x3" kept the previous kernel's fp32 state within ~1e-6 of the reference, "tf32" drifted ~2e-3 over
    1000 tokens (H200). block_v / state_warps / stages shape the sequential kernel, intra_warps the score and
    WY kernels, out_block_v the output kernel (benchmark sweeps).
    """
    B, T, HQ, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dot = dot_precision or "tf32x3"
    if dot not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot!r}")
    inner = {"bf16": "tf32", "bf16x3": "tf32x3"}.get(dot, dot)   # the score / WY kernels' fp32 products
    q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
    N = triton.cdiv(T, CHUNK)
    Tp = N * CHUNK
    BV, BVO = min(block_v, V), min(out_block_v, V)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    op = dict(dtype=torch.bfloat16 if dot == "bf16" else torch.float32, device=dev)
    aqk = torch.empty(B * HQ, Tp, CHUNK, **op)
    ainv = torch.empty(B * HQ, Tp, CHUNK, **f32)
    y, qg, kt = (torch.empty(B * HQ, Tp, K, **op) for _ in range(3))
    gc = torch.empty(B * HQ, N, K, **f32)
    u, vn = (torch.empty(B * HV, Tp, V, **op) for _ in range(2))
    hs = torch.empty(B * HV, N, K, V, **op)
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev) if out is None else out
    fin = torch.empty(B * HV, K, V, **f32)
    sc = float(K ** -0.5 if scale is None else scale)
    _score_kernel[(N, B * HQ)](q, k, g, b, aqk, ainv, T, Tp, sc, HQ=HQ, K=K, L2NORM=use_qk_l2norm, DOT=inner,
                               KS=min(K, 8), num_warps=intra_warps)
    _wy_kernel[(N, B * HQ)](q, k, g, b, v, w, ainv, y, u, qg, kt, gc, T, Tp, sc, HQ=HQ, HV=HV, K=K, V=V,
                            L2NORM=use_qk_l2norm, DOT=inner, KC=min(K, 64), num_warps=intra_warps)
    cx = format_constexprs(fmt)
    dummy = pool.codes
    scales = pool.scales if pool.scales is not None else dummy
    res = pool.residual if pool.residual is not None else dummy
    _state_kernel[(V // BV, B * HV)](
        y, u, kt, gc, hs, vn, fin, pool.codes, scales, slots, N, HQ=HQ, HV=HV, K=K, V=V, BV=BV, INIT=initial,
        MODE=cx["MODE"], ROW=cx["ROW"], DOT=dot, num_warps=state_warps, num_stages=stages)
    _output_kernel[(N, V // BVO, B * HV)](aqk, qg, hs, vn, o, T, N, HQ=HQ, HV=HV, K=K, V=V, BV=BVO, DOT=dot,
                                          num_warps=4)
    stat = effective_static_scales(fmt, static_scales, HV, K, dev)
    _store_kernel[(B * HV,)](fin, pool.codes, scales, res, stat, slots, seed_tensor(fmt, seed, dev), HV=HV, K=K,
                             V=V, INIT=initial, num_warps=4, **cx)
    return o
