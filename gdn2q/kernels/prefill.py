"""Chunked (WY form, chunk 64) Triton prefill that starts from a stored state and leaves S_T stored.

Three launches (GDN2_SPEC.md 2):
1. ``_intra_kernel``, one program per (chunk, sequence x head), all chunks in parallel: decayed score
   matrices Aqk and T in 16x16 blocks (diagonal blocks with exact pairwise exponents, off-diagonal blocks as
   dot products of factors decayed to the end of the earlier block, so no exponential exceeds 1), the
   inverse A = (I + T)^-1 by substitution on the diagonal blocks and block merging, then Y = A E, U = A Z,
   and the chunk's decayed queries (gamma q), tail keys (gamma_C / gamma k) and total decay gamma_C.
2. ``_state_kernel``, one program per (V block, sequence x head), sequential over chunks, only matrix
   products on its critical path: R = U - Y S, O = (gamma q) S + Aqk R, S <- gamma_C S + Ktail^T R.
   It starts from the stored initial state and writes O and the fp32 S_T.
3. ``_store_kernel``: stores S_T into the pool slot in its format (same rounding code as the decode step).
Head dims K, V must be powers of two (16..256); T is arbitrary (the last chunk is zero-padded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2q.kernels.decode import effective_static_scales, seed_tensor
from gdn2q.kernels.state_io import format_constexprs, load_codes, store_state
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
def _st16(ptr, base_row, r0: tl.constexpr, c0: tl.constexpr, x):
    i16 = tl.arange(0, 16)
    tl.store(ptr + (base_row + r0 + i16).to(tl.int64)[:, None] * 64 + c0 + i16[None, :], x)


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
def _intra_kernel(
    q_ptr, k_ptr, g_ptr, b_ptr, v_ptr, w_ptr, aqk_ptr, ainv_ptr, y_ptr, u_ptr, qg_ptr, kt_ptr, gc_ptr,
    T, Tp, scale,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L2NORM: tl.constexpr,
    DOT: tl.constexpr, KS: tl.constexpr,
):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // HV
    hv = bh % HV
    hq = hv // (HV // HQ)
    c0 = n * 64
    row0 = bh * Tp + c0
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
    tl.debug_barrier()

    # whole 64-row tiles: Y = A E, U = A Z, gamma q, Ktail and gamma_C for the sequential pass
    r64 = tl.arange(0, 64)
    ok = tl.arange(0, K)
    ov = tl.arange(0, V)
    rows = (row0 + r64).to(tl.int64)
    a = tl.load(ainv_ptr + rows[:, None] * 64 + r64[None, :])
    k = _rows(k_ptr, bi, hq, c0, T, HQ, K, 64, 0, K)
    k = k * _inv_norm(k, L2NORM)[:, None]
    G = tl.cumsum(_rows(g_ptr, bi, hq, c0, T, HQ, K, 64, 0, K), axis=0)
    gam = tl.exp(G)
    e = gam * _rows(b_ptr, bi, hq, c0, T, HQ, K, 64, 0, K) * k
    tl.store(y_ptr + rows[:, None] * K + ok[None, :], tl.dot(a, e, input_precision=DOT))
    z = _rows(v_ptr, bi, hv, c0, T, HV, V, 64, 0, V) * _rows(w_ptr, bi, hv, c0, T, HV, V, 64, 0, V)
    tl.store(u_ptr + rows[:, None] * V + ov[None, :], tl.dot(a, z, input_precision=DOT))
    glast = tl.sum(tl.where((r64 == 63)[:, None], G, 0.0), axis=0)
    tl.store(kt_ptr + rows[:, None] * K + ok[None, :], k * tl.exp(glast[None, :] - G))
    tl.store(gc_ptr + (bh * (Tp // 64) + n).to(tl.int64) * K + ok, tl.exp(glast))
    q = _rows(q_ptr, bi, hq, c0, T, HQ, K, 64, 0, K)
    q = q * (_inv_norm(q, L2NORM) * scale)[:, None]
    tl.store(qg_ptr + rows[:, None] * K + ok[None, :], q * gam)


@triton.jit
def _state_kernel(
    aqk_ptr, y_ptr, u_ptr, qg_ptr, kt_ptr, gc_ptr, o_ptr, fin_ptr, codes_ptr, scales_ptr, slots_ptr,
    T, Tp, N,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    INIT: tl.constexpr, MODE: tl.constexpr, ROW: tl.constexpr, DOT: tl.constexpr,
):
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // HV
    hv = bh % HV
    ok = tl.arange(0, K)
    ov = pv * BV + tl.arange(0, BV)
    r64 = tl.arange(0, 64)
    if INIT:
        head = tl.load(slots_ptr + bi).to(tl.int64) * HV + hv
        c, sc = load_codes(codes_ptr + head * (K * V) + pv * BV, scales_ptr + head * (K if ROW else 1),
                           ok[:, None] * V + tl.arange(0, BV)[None, :], ok, MODE, ROW)
        s = c * sc[:, None]
    else:
        s = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(N):
        rows = (bh * Tp + n * 64 + r64).to(tl.int64)
        y = tl.load(y_ptr + rows[:, None] * K + ok[None, :])
        u = tl.load(u_ptr + rows[:, None] * V + ov[None, :])
        r = u - tl.dot(y, s, input_precision=DOT)                      # residual write after the erase
        qg = tl.load(qg_ptr + rows[:, None] * K + ok[None, :])
        a = tl.load(aqk_ptr + rows[:, None] * 64 + r64[None, :])
        o = tl.dot(qg, s, input_precision=DOT) + tl.dot(a, r, input_precision=DOT)
        t = n * 64 + r64
        o_off = ((bi * T + t) * HV + hv).to(tl.int64)[:, None] * V + ov[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=(t < T)[:, None])
        kt = tl.load(kt_ptr + rows[:, None] * K + ok[None, :])
        gc = tl.load(gc_ptr + (bh * N + n).to(tl.int64) * K + ok)
        s = s * gc[:, None] + tl.dot(tl.trans(kt), r, input_precision=DOT)
    tl.store(fin_ptr + bh.to(tl.int64) * (K * V) + ok[:, None] * V + ov[None, :], s)


@triton.jit
def _store_kernel(
    fin_ptr, codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, INIT: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
):
    bh = tl.program_id(0)
    bi = bh // HV
    hv = bh % HV
    head = tl.load(slots_ptr + bi).to(tl.int64) * HV + hv
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
        store_state(x, tl.zeros([K], dtype=tl.float32), codes_ptr + tile, scales_ptr + srow, res_ptr + tile,
                    static_ptr + hv * (K if ROW else 1), offs, ok, tl.load(seed_ptr), bh * (K * V),
                    MODE, ROW, 0 if ROUND == 2 else ROUND, STATIC)


def prefill_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, initial: bool = True,
    scale: float | None = None, use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, dot_precision: str = "tf32x3",
    block_v: int = 32, intra_warps: int = 4, stages: int = 1,
) -> torch.Tensor:
    """Launch the three prefill kernels. q, k, g, b: [B, T, HQ, K]; v, w: [B, T, HV, V]; returns o.

    dot_precision "tf32x3" keeps the fp32 state within 1e-6 of the reference; "tf32" is faster but drifts
    ~2e-3 over 1000 tokens (measured on an H200). The sequential kernel runs 4 warps: 8 warps hit an
    illegal-address fault under Triton 3.6 on an H200 that is not understood yet.
    """
    B, T, HQ, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
    N = triton.cdiv(T, CHUNK)
    Tp = N * CHUNK
    BV = min(block_v, V)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    aqk = torch.empty(B * HV, Tp, CHUNK, **f32)
    ainv = torch.empty(B * HV, Tp, CHUNK, **f32)
    y, qg, kt = (torch.empty(B * HV, Tp, K, **f32) for _ in range(3))
    u = torch.empty(B * HV, Tp, V, **f32)
    gc = torch.empty(B * HV, N, K, **f32)
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev) if out is None else out
    fin = torch.empty(B * HV, K, V, **f32)
    sc = float(K ** -0.5 if scale is None else scale)
    _intra_kernel[(N, B * HV)](q, k, g, b, v, w, aqk, ainv, y, u, qg, kt, gc, T, Tp, sc, HQ=HQ, HV=HV, K=K, V=V,
                               L2NORM=use_qk_l2norm, DOT=dot_precision, KS=min(K, 32), num_warps=intra_warps)
    cx = format_constexprs(fmt)
    dummy = pool.codes
    scales = pool.scales if pool.scales is not None else dummy
    res = pool.residual if pool.residual is not None else dummy
    _state_kernel[(V // BV, B * HV)](
        aqk, y, u, qg, kt, gc, o, fin, pool.codes, scales, slots, T, Tp, N, HV=HV, K=K, V=V, BV=BV,
        INIT=initial, MODE=cx["MODE"], ROW=cx["ROW"], DOT=dot_precision, num_warps=4, num_stages=stages)
    stat = effective_static_scales(fmt, static_scales, HV, K, dev)
    _store_kernel[(B * HV,)](fin, pool.codes, scales, res, stat, slots, seed_tensor(fmt, seed, dev), HV=HV, K=K,
                             V=V, INIT=initial, num_warps=4, **cx)
    return o
