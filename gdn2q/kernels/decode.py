"""Fused Triton decode step: one token for B sequences whose states live in a slot-indexed pool.

A program owns one (sequence, value head) state tile [K, V] at a time: it applies the whole step of
GDN2_SPEC.md 1.3 in fp32 registers (optionally computing the gates from pre-activations and L2-normalising
q/k), writes the output and stores the tile back in place in the pool's format. The state is the only large
operand, so the step moves ~2x the stored state bytes and little else. The grid is persistent: each program
walks tiles pid, pid + nprog, ..., and the launch (warps, block sizes, programs per multiprocessor) comes from
the measured table ``LAUNCH``.

Two kernels share that structure: ``_decode_kernel`` for fp32/bf16 tiles (V split into narrow blocks) and
``_decode8_kernel`` for int8/fp8 codes, which works on 32-bit words of four codes
(:mod:`gdn2q.kernels.packed`), needs whole rows per tile (row absmax) and goes over the tile in two passes
of row blocks.
"""

from __future__ import annotations

import importlib.util

import torch
import triton
import triton.language as tl

from gdn2q.kernels import pdl
from gdn2q.kernels.fp8_linear import FP8, Fp8Rows
from gdn2q.kernels.packed import code_byte, pack_bytes, pack_fp8, unpack_fp8_word, unpack_int8_word, unpack_plane
from gdn2q.kernels.reference import OutputNorm
from gdn2q.kernels.state_io import (
    FP8_QMAX,
    FP8_RU,
    INT8_INV_RU,
    INT8_QMAX,
    INT8_RU,
    INTERPRETED,
    MODES,
    TINY,
    format_constexprs,
    tile_mask,
)
from gdn2q.quant.state import QuantizedState, StateQuantConfig

D_TINY: tl.constexpr = tl.constexpr(1e-24)   # floor of a row's d = scale * exp(g) where the update divides by it


@triton.jit
def softplus(x):
    """torch.nn.functional.softplus (beta 1, linear above 20), without libdevice log1p."""
    sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
    sp = tl.where(x < -15.0, tl.exp(x), sp)
    return tl.where(x > 20.0, x, sp)


@triton.jit
def gates_from_preactivations(f, b, a_log, dt_bias, NEG_EIG: tl.constexpr):
    """(log decay g = -exp(A_log) softplus(f + dt_bias), erase gate sigmoid(b), doubled with negative
    eigenvalues), fp32 (GDN2_SPEC.md 1.2 steps 3-4)."""
    g = -tl.exp(a_log) * softplus(f + dt_bias)
    b = tl.sigmoid(b)
    if NEG_EIG:
        b = 2.0 * b
    return g, b


@triton.jit
def rcp(x):
    """1 / x for normal x > 0 to 1 ulp: one MUFU.RCP, where ``tl.fdiv`` spends about ten instructions on range
    fix-ups; every divisor here is floored far above the denormals (D_TINY, TINY / qmax)."""
    if INTERPRETED:
        return 1.0 / x
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _tile_of(t, n_tiles, slots_ptr, HV: tl.constexpr, NPV: tl.constexpr):
    """(sequence, value head, V block, valid, pool head index) of work tile t.

    A tile past the end or on a padding slot is invalid: it reads and writes no state (pool head 0 stands in).
    """
    inside = t < n_tiles
    tt = tl.where(inside, t, 0)
    bi = tt // (HV * NPV)
    hv = (tt // NPV) % HV
    slot = tl.load(slots_ptr + bi).to(tl.int64)
    valid = inside & (slot >= 0)
    return bi, hv, tt % NPV, valid, tl.where(valid, slot, 0) * HV + hv


@triton.jit
def _key_vectors(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, bi, hv, scale, HQ: tl.constexpr,
                 HV: tl.constexpr, K: tl.constexpr, FUSED: tl.constexpr, NEG_EIG: tl.constexpr,
                 L2NORM: tl.constexpr):
    """fp32 q (normalised, scaled), k (normalised), log decay g and erase gate b of one head, and q . k."""
    ok = tl.arange(0, K)
    hq = hv // (HV // HQ)
    off = (bi * HQ + hq) * K + ok
    q = tl.load(q_ptr + off).to(tl.float32)
    k = tl.load(k_ptr + off).to(tl.float32)
    g = tl.load(g_ptr + off).to(tl.float32)
    b = tl.load(b_ptr + off).to(tl.float32)
    if FUSED:  # g holds f = f_proj(x), b a pre-activation
        g, b = gates_from_preactivations(g, b, tl.load(alog_ptr + hq).to(tl.float32),
                                         tl.load(dtb_ptr + hq * K + ok).to(tl.float32), NEG_EIG)
    qq, kk, qk = tl.reduce((q * q, k * k, q * k), 0, _add3)     # one cross-warp round trip, not three
    mq = scale
    mk = 1.0
    if L2NORM:
        mq = scale * tl.rsqrt(qq + 1e-6)
        mk = tl.rsqrt(kk + 1e-6)
    return q * mq, k * mk, g, b, qk * (mq * mk)


@triton.jit
def _value_gate(v_ptr, w_ptr, off, FUSED: tl.constexpr):
    """w * v at value offsets ``off`` (w a pre-activation when FUSED)."""
    v = tl.load(v_ptr + off).to(tl.float32)
    w = tl.load(w_ptr + off).to(tl.float32)
    if FUSED:
        w = tl.sigmoid(w)
    return w * v


@triton.jit
def _value_gates4(v_ptr, w_ptr, vbase, FUSED: tl.constexpr):
    """The value gates of the four code planes (columns vbase + j)."""
    return (_value_gate(v_ptr, w_ptr, vbase + 0, FUSED), _value_gate(v_ptr, w_ptr, vbase + 1, FUSED),
            _value_gate(v_ptr, w_ptr, vbase + 2, FUSED), _value_gate(v_ptr, w_ptr, vbase + 3, FUSED))


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, alog_ptr, dtb_ptr, o_ptr, state_ptr, slots_ptr, scale, n_tiles,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, STAGES: tl.constexpr,
    FUSED: tl.constexpr, NEG_EIG: tl.constexpr, L2NORM: tl.constexpr, MODE: tl.constexpr,
):
    """The decode step for fp32/bf16 states, in tiles [K, BV].

    Each tile is loaded before the row terms (normalised q and k, decay) are computed, so its memory latency
    hides behind that arithmetic. Walking several blocks per tile instead (row terms once per head) measured
    slower on the H200: the first block's load then waited for the row terms, and the terms kept across the
    blocks cost registers. Holding the next tile while updating this one was slower too (registers).
    """
    NPV: tl.constexpr = V // BV
    ok = tl.arange(0, K)
    # 8-byte vectors (4 bf16 columns per thread), not 16: 8 lanes along V leave 4 along K, so the column sums
    # take 2 shuffle rounds instead of 3 (bf16, 2 warps x 32 columns: 888 -> 808 instructions per tile, B=256
    # 94.8 -> 91.0 µs; 88.3 µs at the launch retuned for it). fp32 vectors hold 4 columns anyway.
    ov = tl.max_contiguous(tl.arange(0, BV), 4)
    offs = ok[:, None] * V + ov[None, :]
    for t in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        bi, hv, pv, valid, head = _tile_of(t, n_tiles, slots_ptr, HV, NPV)
        blk = state_ptr + head * (K * V) + pv * BV + offs
        m = tile_mask(valid, offs)
        c = tl.load(blk, mask=m).to(tl.float32)
        q, k, g, b, qk = _key_vectors(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, bi, hv, scale, HQ, HV, K,
                                      FUSED, NEG_EIG, L2NORM)
        # The state after this token's decay is S d[:, None] (d = exp(g)), so the erase read r and the pre-write
        # part of the output read come straight off the stored tile in one pass, and
        # o = q^T S' = q^T (S d) + (q . k) u needs no second pass over the updated tile.
        d = tl.exp(g)
        r, o_pre = tl.reduce(((b * k * d)[:, None] * c, (q * d)[:, None] * c), 0, _add2)
        v_off = (bi * HV + hv) * V + pv * BV + ov
        u = _value_gate(v_ptr, w_ptr, v_off, FUSED) - r
        s = d[:, None] * c + k[:, None] * u[None, :]               # decayed state plus the rank-1 write
        if MODE == 1:
            tl.store(blk, s.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=m)
        else:
            tl.store(blk, s, mask=m)
        tl.store(o_ptr + v_off, tl.where(valid, o_pre + qk * u, 0.0).to(o_ptr.dtype.element_ty))


@triton.jit
def _stage_rows(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, scales_ptr, rows_ptr, bi, hv, head, valid, scale,
                HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, FUSED: tl.constexpr, NEG_EIG: tl.constexpr,
                L2NORM: tl.constexpr, ROW: tl.constexpr, MODE: tl.constexpr, ROUND: tl.constexpr):
    """Per-row terms of one tile, computed once (a row or a few per thread) and staged in the program's scratch
    rows_ptr [5, K]; returns q . k (q, k normalised, q scaled).

    Staged: the erase weights e = b k d and read weights p = q d of pass 1 (d = row scale * exp(g)), and for
    pass 2 d floored at D_TINY (full decay or an empty row leaves k u; k / d stays finite), k / d and the
    residual's unit over d (error feedback). The passes go over the tile in blocks of rows in a layout where
    several threads share a row; computing these there cost every thread its rows' exponentials again in each
    pass, which made up a tenth of the kernel's instructions.
    """
    ok = tl.arange(0, K)
    sc = tl.load(scales_ptr + head * (K if ROW else 1) + (ok if ROW else ok * 0), mask=tile_mask(valid, ok),
                 other=0.0)
    q, k, g, b, qk = _key_vectors(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, bi, hv, scale, HQ, HV, K, FUSED,
                                  NEG_EIG, L2NORM)
    d = sc * tl.exp(g)
    dc = tl.maximum(d, D_TINY)
    tl.debug_barrier()          # the previous tile's passes have read the scratch
    tl.store(rows_ptr + ok, b * k * d)
    tl.store(rows_ptr + K + ok, q * d)
    tl.store(rows_ptr + 2 * K + ok, dc)
    inv_dc = rcp(dc)   # 1 ulp: far inside the one-step tolerance of a code
    tl.store(rows_ptr + 3 * K + ok, k * inv_dc)
    if ROUND == 2:
        tl.store(rows_ptr + 4 * K + ok, sc * (INT8_RU if MODE == 2 else FP8_RU) * inv_dc)
    tl.debug_barrier()          # every thread's rows are staged
    return qk


@triton.jit
def _unpack(wd, MODE: tl.constexpr):
    """The four code planes of a tile of words, as fp32."""
    if MODE == 2:
        x0, x1, x2, x3 = unpack_int8_word(wd)
    else:
        x0, x1, x2, x3 = unpack_fp8_word(wd)
    return x0, x1, x2, x3


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _plane_update(x, kd, u, rs, J: tl.constexpr, rd, MODE: tl.constexpr, ROUND: tl.constexpr):
    """Plane of the updated rows divided by their d: x + (k / d) u (+ residual * ru * old scale / d).

    The new state is d * this; keeping d out of the plane lets one multiply per element carry both d and
    the new scale, and the row absmax is d * the plane's absmax (d >= 0).
    """
    t = x + kd[:, None] * u[None, :]
    if ROUND == 2:
        t = t + unpack_plane(rs, J, MODE) * rd[:, None]
    return t


@triton.jit
def _tile_pass(tile_words, res_words, rows_ptr, offs, m, rows, u0, u1, u2, u3, K: tl.constexpr, MODE: tl.constexpr,
               ROUND: tl.constexpr):
    """(d, the four planes of x + (k / d) u) of a block of rows, read again from the codes."""
    wd = tl.load(tile_words + offs, mask=m)
    d = tl.load(rows_ptr + 2 * K + rows)
    kd = tl.load(rows_ptr + 3 * K + rows)
    rs = 0
    rd = kd
    if ROUND == 2:
        rs = tl.load(res_words + offs, mask=m)
        rd = tl.load(rows_ptr + 4 * K + rows)
    x0, x1, x2, x3 = _unpack(wd, MODE)
    return (d, _plane_update(x0, kd, u0, rs, 0, rd, MODE, ROUND), _plane_update(x1, kd, u1, rs, 1, rd, MODE, ROUND),
            _plane_update(x2, kd, u2, rs, 2, rd, MODE, ROUND), _plane_update(x3, kd, u3, rs, 3, rd, MODE, ROUND))


@triton.jit
def _abs_max4(t0, t1, t2, t3):
    return tl.max(tl.maximum(tl.maximum(tl.abs(t0), tl.abs(t1)), tl.maximum(tl.abs(t2), tl.abs(t3))), axis=1)


@triton.jit
def _store_output_norm(o0, o1, o2, o3, valid, z_ptrs, zb_ptrs, w_ptrs, words_ptrs, scale_ptr, eps,
                       V: tl.constexpr, ZBIAS: tl.constexpr, SIGMOID: tl.constexpr):
    """One value head's output row (planes p = 0..3 hold columns 4j + p) through the gated RMSNorm, stored as
    e4m3 code words with the row's scale (absmax / 448), as quantize_blocks_reference rounds it."""
    r = tl.rsqrt((tl.sum(o0 * o0, axis=0) + tl.sum(o1 * o1, axis=0) + tl.sum(o2 * o2, axis=0)
                  + tl.sum(o3 * o3, axis=0)) / V + eps)
    y0 = _gated_plane(o0, r, valid, z_ptrs, zb_ptrs, w_ptrs, 0, ZBIAS, SIGMOID)
    y1 = _gated_plane(o1, r, valid, z_ptrs, zb_ptrs, w_ptrs, 1, ZBIAS, SIGMOID)
    y2 = _gated_plane(o2, r, valid, z_ptrs, zb_ptrs, w_ptrs, 2, ZBIAS, SIGMOID)
    y3 = _gated_plane(o3, r, valid, z_ptrs, zb_ptrs, w_ptrs, 3, ZBIAS, SIGMOID)
    amax = tl.max(tl.maximum(tl.maximum(tl.abs(y0), tl.abs(y1)), tl.maximum(tl.abs(y2), tl.abs(y3))), axis=0)
    s = tl.maximum(amax, 1e-12) / FP8_QMAX
    tl.store(words_ptrs, pack_fp8(_clamp_fp8(y0 / s), _clamp_fp8(y1 / s), _clamp_fp8(y2 / s), _clamp_fp8(y3 / s)))
    tl.store(scale_ptr, s)


@triton.jit
def _gated_plane(o, r, valid, z_ptrs, zb_ptrs, w_ptrs, p: tl.constexpr, ZBIAS: tl.constexpr,
                 SIGMOID: tl.constexpr):
    z = tl.load(z_ptrs + p).to(tl.float32)
    if ZBIAS:
        z += tl.load(zb_ptrs + p).to(tl.float32)
    gate = tl.sigmoid(z) if SIGMOID else z * tl.sigmoid(z)
    return tl.where(valid, o * r * tl.load(w_ptrs + p).to(tl.float32) * gate, 0.0)


@triton.jit
def _clamp_fp8(y):
    return tl.minimum(tl.maximum(y, -FP8_QMAX), FP8_QMAX)


@triton.jit
def _decode8_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, alog_ptr, dtb_ptr, o_ptr,
    codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr, scratch_ptr, scale, n_tiles,
    z_ptr, zb_ptr, nw_ptr, os_ptr, z_stride, eps,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr,
    STAGES: tl.constexpr,
    FUSED: tl.constexpr, NEG_EIG: tl.constexpr, L2NORM: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
    OUT_NORM: tl.constexpr = False, ZBIAS: tl.constexpr = False, SIGMOID: tl.constexpr = False,
    TRIGGER: tl.constexpr = False,
):
    """The decode step for int8/fp8 codes (see :mod:`gdn2q.kernels.packed`), one tile per (sequence, value
    head), walked by a persistent grid, in two passes over blocks of BK key rows.

    The tile's per-row terms are staged first (:func:`_stage_rows`, in scratch_ptr [programs, 5, K]). Pass 1
    reads the code words and accumulates the erase and output reads elementwise ([BK, V/4]
    accumulators, so each term is one FMA and the tile crosses warps in one reduction at the end); pass 2
    reads the words again (now from L1/L2), applies the update and stores the new codes and row scales. Only
    a row block of codes is live at a time (128 registers at 8-row blocks, against 255 for a kernel that held
    the whole tile and prefetched the next), so many one-warp programs share a multiprocessor and hide each
    other's memory latency; STAGES > 1 streams each pass's blocks through shared memory ahead of their use.
    Head-granularity dynamic scales need the tile's absmax first: an extra pass.

    OUT_NORM: o is the gated RMSNorm of the output row as e4m3 code words (o_ptr int32 [B, HV * V / 4]) with
    one scale per (sequence, head) in os_ptr (:class:`gdn2q.kernels.reference.OutputNorm`). TRIGGER lets the
    next kernel of the stream launch (programmatic dependent launch) once every program has started.
    """
    pdl.launch_dependents(TRIGGER)
    W: tl.constexpr = V // 4
    NK: tl.constexpr = K // BK
    orow = tl.arange(0, BK)
    om = tl.arange(0, W)
    woffs = orow[:, None] * W + om[None, :]
    rows_ptr = scratch_ptr + tl.program_id(0) * (5 * K)
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        bi, hv, _, valid, head = _tile_of(t, n_tiles, slots_ptr, HV, 1)
        tile_words = codes_ptr + head * (K * W)
        vbase = (bi * HV + hv) * V + om * 4
        if NK == 1:   # one block (few tiles, latency-bound): the codes and values load while the rows are staged
            wd0 = tl.load(tile_words + woffs, mask=tile_mask(valid, woffs))
            vg0, vg1, vg2, vg3 = _value_gates4(v_ptr, w_ptr, vbase, FUSED)
        qk = _stage_rows(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, scales_ptr, rows_ptr, bi, hv, head, valid,
                         scale, HQ, HV, K, FUSED, NEG_EIG, L2NORM, ROW, MODE, ROUND)

        zero = tl.zeros([BK, W], dtype=tl.float32)
        ae0, ae1, ae2, ae3, ap0, ap1, ap2, ap3 = zero, zero, zero, zero, zero, zero, zero, zero
        for c in tl.range(0, NK, loop_unroll_factor=UNROLL, num_stages=STAGES):
            rows = c * BK + orow
            if NK == 1:
                wd = wd0
            else:
                wd = tl.load(tile_words + c * (BK * W) + woffs, mask=tile_mask(valid, woffs))
            e = tl.load(rows_ptr + rows)
            p = tl.load(rows_ptr + K + rows)
            x0, x1, x2, x3 = _unpack(wd, MODE)
            e2, p2 = e[:, None], p[:, None]
            ae0, ae1, ae2, ae3 = ae0 + e2 * x0, ae1 + e2 * x1, ae2 + e2 * x2, ae3 + e2 * x3
            ap0, ap1, ap2, ap3 = ap0 + p2 * x0, ap1 + p2 * x1, ap2 + p2 * x2, ap3 + p2 * x3
        r0, r1, r2, r3, o0, o1, o2, o3 = tl.reduce((ae0, ae1, ae2, ae3, ap0, ap1, ap2, ap3), 0, _add8)

        if NK > 1:   # loaded here, they would hold registers through pass 1
            vg0, vg1, vg2, vg3 = _value_gates4(v_ptr, w_ptr, vbase, FUSED)
        u0, u1, u2, u3 = vg0 - r0, vg1 - r1, vg2 - r2, vg3 - r3
        if OUT_NORM:
            zrow = bi.to(tl.int64) * z_stride + hv * V + om * 4
            _store_output_norm(o0 + qk * u0, o1 + qk * u1, o2 + qk * u2, o3 + qk * u3, valid, z_ptr + zrow,
                               zb_ptr + hv * V + om * 4, nw_ptr + om * 4, o_ptr + (bi * HV + hv) * W + om,
                               os_ptr + bi * HV + hv, eps, V, ZBIAS, SIGMOID)
        else:
            od = o_ptr.dtype.element_ty
            tl.store(o_ptr + vbase + 0, tl.where(valid, o0 + qk * u0, 0.0).to(od))
            tl.store(o_ptr + vbase + 1, tl.where(valid, o1 + qk * u1, 0.0).to(od))
            tl.store(o_ptr + vbase + 2, tl.where(valid, o2 + qk * u2, 0.0).to(od))
            tl.store(o_ptr + vbase + 3, tl.where(valid, o3 + qk * u3, 0.0).to(od))

        qmax = INT8_QMAX if MODE == 2 else FP8_QMAX
        res_words = res_ptr + head * (K * W)
        head_amax = 0.0
        if not ROW and not STATIC:   # one scale for the whole tile: its absmax first
            for c in tl.range(0, NK, loop_unroll_factor=UNROLL, num_stages=STAGES):
                offs = c * (BK * W) + woffs
                d, t0, t1, t2, t3 = _tile_pass(tile_words, res_words, rows_ptr, offs, tile_mask(valid, offs),
                                               c * BK + orow, u0, u1, u2, u3, K, MODE, ROUND)
                head_amax = tl.maximum(head_amax, tl.max(d * _abs_max4(t0, t1, t2, t3), axis=0))

        seed = tl.load(seed_ptr)
        for c in tl.range(0, NK, loop_unroll_factor=UNROLL, num_stages=STAGES):
            rows = c * BK + orow
            offs = c * (BK * W) + woffs
            m = tile_mask(valid, offs)
            d, t0, t1, t2, t3 = _tile_pass(tile_words, res_words, rows_ptr, offs, m, rows, u0, u1, u2, u3, K, MODE,
                                           ROUND)
            if STATIC:
                sc_new = tl.load(static_ptr + hv * (K if ROW else 1) + (rows if ROW else rows * 0))
            elif ROW:
                sc_new = tl.maximum(d * _abs_max4(t0, t1, t2, t3), TINY) / qmax
            else:
                sc_new = tl.zeros([BK], dtype=tl.float32) + tl.maximum(head_amax, TINY) / qmax
            mult = (d * rcp(sc_new))[:, None]      # new codes: d t / new scale
            y0, y1, y2, y3 = t0 * mult, t1 * mult, t2 * mult, t3 * mult
            if MODE == 3 and ROUND == 0:
                wd_new = pack_fp8(y0, y1, y2, y3)
            else:
                rnd = (bi * HV + hv) * (K * V) + rows[:, None] * V + om[None, :] * 4
                n0 = tl.rand(seed, rnd) if ROUND == 1 else y0
                n1 = tl.rand(seed, rnd + 1) if ROUND == 1 else y1
                n2 = tl.rand(seed, rnd + 2) if ROUND == 1 else y2
                n3 = tl.rand(seed, rnd + 3) if ROUND == 1 else y3
                clamp = STATIC or ROUND == 1
                b0, c0 = code_byte(y0, n0, MODE, ROUND, clamp)
                b1, c1 = code_byte(y1, n1, MODE, ROUND, clamp)
                b2, c2 = code_byte(y2, n2, MODE, ROUND, clamp)
                b3, c3 = code_byte(y3, n3, MODE, ROUND, clamp)
                wd_new = pack_bytes(b0, b1, b2, b3)
                if ROUND == 2:   # residual codes: int8 in 1/254 of a step, fp8 in whole steps
                    f = INT8_INV_RU if MODE == 2 else 1.0
                    rb0 = code_byte((y0 - c0) * f, y0, MODE, 0, False)[0]
                    rb1 = code_byte((y1 - c1) * f, y1, MODE, 0, False)[0]
                    rb2 = code_byte((y2 - c2) * f, y2, MODE, 0, False)[0]
                    rb3 = code_byte((y3 - c3) * f, y3, MODE, 0, False)[0]
                    tl.store(res_words + offs, pack_bytes(rb0, rb1, rb2, rb3), mask=m)
            tl.store(tile_words + offs, wd_new, mask=m)
            if ROW:   # stored as a column, so no layout change: the replicas write the same value
                srow = rows[:, None] + om[None, :] * 0
                tl.store(scales_ptr + head * K + srow, sc_new[:, None] + tl.zeros([BK, W], dtype=tl.float32),
                         mask=tile_mask(valid, srow) & (om[None, :] == 0))
        if not ROW:   # after the last block: every block reads the old scale
            sc_head = tl.load(static_ptr + hv) if STATIC else tl.maximum(head_amax, TINY) / qmax
            tl.store(scales_ptr + head + orow * 0, sc_head + tl.zeros([BK], dtype=tl.float32),
                     mask=tile_mask(valid, orow) & (orow == 0))


def effective_static_scales(fmt: StateQuantConfig, static_scales: torch.Tensor | None, HV: int, K: int,
                            device: torch.device) -> torch.Tensor:
    """Static scales as the kernels read them: fp32 [HV, K] (row) or [HV, 1] (head), like quantize_state."""
    if fmt.scales != "static" or not fmt.quantized:
        return seed_tensor(StateQuantConfig(), None, device)           # any tensor: never read
    if static_scales is None:
        from gdn2q.errors import ConfigError

        raise ConfigError("static state scales need a calibration file (gdn2q calibrate) with state statistics")
    s = static_scales.float().to(device).reshape(HV, -1)
    if fmt.granularity == "head":
        s = s.amax(-1, keepdim=True)
    return s.contiguous()


_ZERO_SEEDS: dict[torch.device, torch.Tensor] = {}


def seed_tensor(fmt: StateQuantConfig, seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Philox seed for stochastic rounding as a 1-element int64 device tensor.

    Nothing here copies from the host when ``seed`` is a tensor or None, so launches can be graph-captured.
    """
    if isinstance(seed, torch.Tensor):
        return seed
    if seed is not None:
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if fmt.rounding == "stochastic":
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    if device not in _ZERO_SEEDS:
        _ZERO_SEEDS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _ZERO_SEEDS[device]


# Launch parameters per storage kind and load (tier): the fastest variants (or within 1% of them) that passed
# the one-step check in ``tools/bench_kernels.py --tune`` on an H200 (H=16, K=V=128; the tiers timed at B=1,
# 64 and 256; docs/benchmarks/kernels-NVIDIA-H200.json). Few heads are latency-bound: a whole tile per 4-warp
# program (one block of rows, so the second pass re-reads codes still in L1). More heads are throughput-bound:
# one warp per int8/fp8 tile in blocks of 8 rows, each pass streamed three stages deep through shared memory
# (11% faster at B=256 than loading each block where it is used). Blocks of 4 rows need only 64 registers but
# their per-block overhead made them 40% slower; capping registers to fit 18-24 one-warp programs per
# multiprocessor (a few spills) was 6-47% slower. Narrow V blocks for fp32/bf16.
# "8bit-staged" is the Gluon kernel of decode_staged.py (formats it covers, GPU only), used where the table has a
# tier for it. H100, one process each (docs/kernels.md): with pass 1 on the tensor cores, int8 at B=1 / 8 / 64 / 256
# 8.2 / 9.5 / 20.6-20.8 / 61.3-62.1 us against 9.8 / 11.0 / 23.5-23.7 / 81.0 for the one-warp kernel (fp8 alike).
# The medium tier keeps the one-warp kernel all the same: in the graphed 1.3B step (B=64, fused gates and output
# norm, PDL) the Gluon kernel made the step slower, 1.451-1.457 against 1.4415-1.4421 ms. Four 4-warp programs
# per multiprocessor: their registers (104-125 a thread; capped at 128) and shared memory (two 16 KB tiles)
# allow no more; five under a 96-register cap were 1-2% slower.
LAUNCH: dict[tuple[str, str], dict[str, int]] = {
    ("8bit", "few"): dict(num_warps=4, block_k=128, unroll=1, stages=1, programs_per_sm=2),
    ("8bit", "medium"): dict(num_warps=1, block_k=8, unroll=2, stages=3, programs_per_sm=16),
    ("8bit", "many"): dict(num_warps=1, block_k=8, unroll=2, stages=3, programs_per_sm=16),
    ("8bit-staged", "few"): dict(num_warps=4, unroll=2, programs_per_sm=4, maxnreg=128),
    ("8bit-staged", "many"): dict(num_warps=4, unroll=2, programs_per_sm=4, maxnreg=128),
    ("bf16", "few"): dict(num_warps=4, block_v=32, stages=1, programs_per_sm=8),
    ("bf16", "medium"): dict(num_warps=4, block_v=64, stages=1, programs_per_sm=4),
    ("bf16", "many"): dict(num_warps=4, block_v=64, stages=1, programs_per_sm=4),
    ("fp32", "few"): dict(num_warps=4, block_v=32, stages=1, programs_per_sm=8),
    ("fp32", "medium"): dict(num_warps=4, block_v=64, stages=1, programs_per_sm=4),
    ("fp32", "many"): dict(num_warps=4, block_v=64, stages=1, programs_per_sm=4),
}
# With a fused output norm (its consumer is the o_proj GEMM, which asks L2 for its first weight tiles before
# waiting), let that GEMM launch while the recurrence runs. H200, graphed 1.3B fp8 + int8 step at B=64 (one-off
# script, same process): 1.2867 / 1.2932 ms with it, 1.3309 / 1.3308 without.
EARLY_DEPENDENTS = True
TIERS = ((4, "few"), (16, "medium"))   # (heads per multiprocessor below which, tier); at or above: "many"


def _has_gluon() -> bool:
    """This Triton ships Gluon (the language of decode_staged.py, experimental in recent Triton releases)."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ImportError:   # no triton.experimental at all
        return False


_GLUON = _has_gluon()


def staged_supported(fmt: StateQuantConfig, K: int, V: int) -> bool:
    """The formats and shapes the Gluon kernel of decode_staged.py covers (where this Triton has Gluon)."""
    return (_GLUON and fmt.quantized and fmt.granularity == "row" and fmt.scales == "dynamic"
            and fmt.rounding == "nearest" and K == 128 and V == 128)


def launch_tier(heads: int, sms: int) -> str:
    """The load tier of ``heads`` (sequence, value head) tiles on ``sms`` multiprocessors."""
    return next((tier for per_sm, tier in TIERS if heads < per_sm * sms), "many")


def launch_params(fmt: StateQuantConfig, heads: int, sms: int, K: int = 128, V: int = 128,
                  **overrides: int | None) -> dict[str, int]:
    """The launch of ``LAUNCH`` for ``heads`` tiles of [K, V], with the non-None overrides applied.

    ``staged`` (int8/fp8 only) picks the kernel: 1 the Gluon kernel of decode_staged.py (formats and shapes
    :func:`staged_supported` accepts), 0 the one-warp Triton kernel; None (default) the staged kernel where the
    table has an "8bit-staged" entry for the tier and the format allows it.
    """
    known = {"num_warps", "programs_per_sm", "stages", "block_v", "block_k", "unroll", "staged", "maxnreg"}
    if unknown := set(overrides) - known:
        raise TypeError(f"unknown decode launch option(s) {sorted(unknown)}; choose from {sorted(known)}")
    tier = launch_tier(heads, sms)
    staged = overrides.pop("staged", None)
    if staged and not (fmt.quantized and staged_supported(fmt, K, V)):
        raise ValueError("staged=1 needs an int8/fp8 state with dynamic row scales and nearest rounding, K = V = 128")
    if staged is None:
        staged = fmt.quantized and staged_supported(fmt, K, V) and ("8bit-staged", tier) in LAUNCH
    kind = "8bit-staged" if staged else "8bit" if fmt.quantized else fmt.dtype
    base = dict(LAUNCH.get((kind, tier)) or LAUNCH[(kind, "many")], staged=int(bool(staged)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return base


def decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, allow_neg_eigval: bool = False, scale: float | None = None,
    use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, out_norm: OutputNorm | None = None,
    **launch: int | None,
) -> torch.Tensor | Fp8Rows:
    """Launch the decode kernel. q, k, g, b: [B, HQ, K]; v, w: [B, HV, V]; returns o [B, HV, V], or with
    ``out_norm`` (int8/fp8 states) its gated RMSNorm as e4m3 codes [B, HV * V] with scales [B, HV].

    ``launch`` overrides keys of :data:`LAUNCH` (benchmark sweeps): num_warps, programs_per_sm (the grid is
    persistent: at most that many programs per multiprocessor), stages (> 1 lets Triton stream the state
    through shared memory with asynchronous copies), block_v (fp32/bf16: V columns per tile), block_k and
    unroll (int8/fp8: key rows per block of the two passes, and their unrolling; tiles are whole rows), staged
    (int8/fp8: 1 the Gluon kernel, 0 the Triton one; see :func:`launch_params`) and maxnreg (the Gluon kernel's
    register cap per thread, which fixes how many programs fit a multiprocessor). The Gluon kernel has no CPU
    interpreter: under ``TRITON_INTERPRET=1`` the Triton kernel runs instead.
    """
    B, HQ, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    fused = A_log is not None
    q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
    if out_norm is not None and (not fmt.quantized or out is not None):
        raise ValueError("out_norm needs an int8/fp8 state and no out buffer")
    if out_norm is not None:   # e4m3 rows for o_proj, written as words of four codes, and their scales
        o = torch.empty(B, HV * V, dtype=FP8, device=q.device)
        o_scales = torch.empty(B, HV, dtype=torch.float32, device=q.device)
    else:
        o = torch.empty_like(v) if out is None else out
    sms = _sm_count(q.device)
    lp = launch_params(fmt, B * HV, sms, K, V, **launch)
    if lp["staged"] and INTERPRETED:   # the interpreter cannot run Gluon: the Triton kernel's launch for the tier
        lp = launch_params(fmt, B * HV, sms, K, V, **{**launch, "staged": 0})
    if fmt.quantized and lp.get("block_v", V) < V:
        raise ValueError("quantized states need whole rows per program (block_v >= V)")
    BV = min(V, lp.get("block_v", V))
    n_tiles = B * HV * (V // BV)
    grid = (min(n_tiles, sms * lp["programs_per_sm"]),)
    args = (q, k, v, g, b, w, A_log if fused else q, dt_bias if fused else q,
            o if out_norm is None else o.view(torch.int32))
    scale = float(K ** -0.5 if scale is None else scale)
    meta = dict(HQ=HQ, HV=HV, K=K, V=V, FUSED=fused, NEG_EIG=allow_neg_eigval, L2NORM=use_qk_l2norm,
                STAGES=lp.get("stages", 1), num_warps=lp["num_warps"], num_stages=1)
    if fmt.quantized:   # code words: four int8/fp8 codes per int32
        words = pool.codes.view(torch.int32)
        res = pool.residual.view(torch.int32) if pool.residual is not None else words
        stat = effective_static_scales(fmt, static_scales, HV, K, q.device)
        scratch = None if lp["staged"] else torch.empty(grid[0], 5, K, dtype=torch.float32, device=q.device)
        norm: tuple = (q, q, q, q, 0, 0.0)
        if out_norm is not None:
            z = out_norm.z if out_norm.z.stride(-1) == 1 else out_norm.z.contiguous()
            zb = z if out_norm.z_bias is None else out_norm.z_bias
            norm = (z, zb, out_norm.weight, o_scales, z.stride(0), float(out_norm.eps))
            meta.update(OUT_NORM=True, ZBIAS=out_norm.z_bias is not None, SIGMOID=out_norm.activation == "sigmoid",
                        TRIGGER=pdl.active(q.device) and EARLY_DEPENDENTS)
        if lp["staged"]:
            from gdn2q.kernels.decode_staged import _decode8_staged_kernel

            _decode8_staged_kernel[grid](*args, words, pool.scales, slots, scale, n_tiles, *norm,
                                         MODE=MODES[fmt.dtype], UNROLL=lp["unroll"], maxnreg=lp.get("maxnreg"),
                                         **{k: v for k, v in meta.items() if k != "STAGES"})
        else:
            _decode8_kernel[grid](*args, words, pool.scales, res, stat, slots, seed_tensor(fmt, seed, q.device),
                                  scratch, scale, n_tiles, *norm, BK=min(K, lp["block_k"]), UNROLL=lp["unroll"],
                                  **meta, **format_constexprs(fmt))
        if out_norm is not None:
            return o, o_scales
    else:
        _decode_kernel[grid](*args, pool.codes, slots, scale, n_tiles, BV=BV, MODE=MODES[fmt.dtype], **meta)
    return o


def decode_kernel(fmt: StateQuantConfig, heads: int, device: torch.device, K: int = 128, V: int = 128) -> str:
    """Which kernel a default-launch decode step of ``heads`` (sequence, value head) tiles runs on ``device``:
    "gluon-staged" (decode_staged.py) or "triton" (this module's kernels), as benchmarks report it."""
    staged = launch_params(fmt, heads, _sm_count(device), K, V)["staged"] and not INTERPRETED
    return "gluon-staged" if staged else "triton"


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the interpreter: 4, enough to exercise the persistent loop)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
