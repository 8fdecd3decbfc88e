"""Fused Triton decode step: one token for B sequences whose states live in a slot-indexed pool.

A program owns one (sequence, value head) state tile [K, V] at a time: it applies the whole step of
GDN2_SPEC.md 1.3 in fp32 registers (optionally computing the gates from pre-activations and L2-normalising
q/k), writes the output and stores the tile back in place in the pool's format. The state is the only large
operand, so the step moves ~2x the stored state bytes and little else. The grid is persistent: each program
walks tiles pid, pid + nprog, ...; the int8/fp8 kernel issues the loads of its next tile before it works on
the current one, so the state reads stay in flight behind the arithmetic.

Two kernels share that structure: ``_decode_kernel`` for fp32/bf16 tiles (which may split V across tiles when
there are few sequences) and ``_decode8_kernel`` for int8/fp8 codes, which works on 32-bit words of four
codes (:mod:`gdn2q.kernels.packed`) and needs whole rows per tile (row absmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2q.kernels.packed import code_byte, pack_bytes, pack_fp8, unpack_fp8_word, unpack_plane
from gdn2q.kernels.state_io import (
    FP8_QMAX,
    FP8_RU,
    INT8_INV_RU,
    INT8_QMAX,
    INT8_RU,
    TINY,
    codes_to_float,
    format_constexprs,
    load_tile,
    store_tile,
    tile_mask,
)
from gdn2q.quant.state import QuantizedState, StateQuantConfig


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, linear above 20), without libdevice log1p."""
    sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
    sp = tl.where(x < -15.0, tl.exp(x), sp)
    return tl.where(x > 20.0, x, sp)


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
    """fp32 q (normalised, scaled), k (normalised), log decay g and erase gate b of one head."""
    ok = tl.arange(0, K)
    hq = hv // (HV // HQ)
    off = (bi * HQ + hq) * K + ok
    q = tl.load(q_ptr + off).to(tl.float32)
    k = tl.load(k_ptr + off).to(tl.float32)
    g = tl.load(g_ptr + off).to(tl.float32)
    b = tl.load(b_ptr + off).to(tl.float32)
    if FUSED:  # g holds f = f_proj(x), b a pre-activation (GDN2_SPEC.md 1.2 steps 3-4)
        a = tl.exp(tl.load(alog_ptr + hq).to(tl.float32))
        g = -a * _softplus(g + tl.load(dtb_ptr + hq * K + ok).to(tl.float32))
        b = tl.sigmoid(b)
        if NEG_EIG:
            b = 2.0 * b
    if L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    return q * scale, k, g, b


@triton.jit
def _value_gate(v_ptr, w_ptr, off, FUSED: tl.constexpr):
    """w * v at value offsets ``off`` (w a pre-activation when FUSED)."""
    v = tl.load(v_ptr + off).to(tl.float32)
    w = tl.load(w_ptr + off).to(tl.float32)
    if FUSED:
        w = tl.sigmoid(w)
    return w * v


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, alog_ptr, dtb_ptr, o_ptr,
    codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr, scale, n_tiles,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    FUSED: tl.constexpr, NEG_EIG: tl.constexpr, L2NORM: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
):
    """The decode step for fp32/bf16 tiles [K, BV]. Holding the next tile while updating this one made bf16
    slower on the H200 (its registers), so these tiles are loaded where they are used."""
    NPV: tl.constexpr = V // BV
    ok = tl.arange(0, K)
    ov = tl.arange(0, BV)
    offs = ok[:, None] * V + ov[None, :]
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        bi, hv, pv, valid, head = _tile_of(t, n_tiles, slots_ptr, HV, NPV)
        tile = head * (K * V) + pv * BV
        c, sc = load_tile(codes_ptr + tile, scales_ptr, offs, ok, valid, MODE, ROW)
        c = codes_to_float(c, MODE)
        q, k, g, b = _key_vectors(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, bi, hv, scale, HQ, HV, K,
                                  FUSED, NEG_EIG, L2NORM)
        v_off = (bi * HV + hv) * V + pv * BV + ov
        # The stored tile is c * d[:, None] after this token's decay (d = row scale * exp(g)), so the erase
        # read r and the pre-write part of the output read come straight off the codes in one pass, and
        # o = q^T S' = q^T (c d) + (q . k) u needs no second pass over the updated tile.
        d = sc * tl.exp(g)
        r, o_pre = tl.reduce(((b * k * d)[:, None] * c, (q * d)[:, None] * c), 0, _add2)
        u = _value_gate(v_ptr, w_ptr, v_off, FUSED) - r
        o = o_pre + tl.sum(q * k, axis=0) * u
        s = d[:, None] * c + k[:, None] * u[None, :]               # decayed state plus the rank-1 write
        store_tile(s, sc, 0, codes_ptr + tile, scales_ptr, res_ptr, static_ptr, offs, ok, valid, 0, 0,
                   MODE, ROW, ROUND, STATIC)
        tl.store(o_ptr + v_off, tl.where(valid, o, 0.0).to(o_ptr.dtype.element_ty))


@triton.jit
def _load_words(codes_ptr, scales_ptr, head, woffs, ok, valid, ROW: tl.constexpr, K: tl.constexpr,
                W: tl.constexpr):
    """Code words [K, W] and row scales [K] of one head's tile."""
    wd = tl.load(codes_ptr + head * (K * W) + woffs, mask=tile_mask(valid, woffs))
    sc = tl.load(scales_ptr + head * (K if ROW else 1) + (ok if ROW else ok * 0), mask=tile_mask(valid, ok),
                 other=0.0)
    return wd, sc


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _plane_reads(x0, x1, x2, x3, e, p):
    """Erase reads sum_i e_i x_ij and pre-write output reads sum_i p_i x_ij of the four planes.

    One eight-operand reduction, so the partial sums cross warps in a single shared-memory round trip
    (separate tl.sum calls would each add a barrier).
    """
    e2, p2 = e[:, None], p[:, None]
    return tl.reduce((e2 * x0, e2 * x1, e2 * x2, e2 * x3, p2 * x0, p2 * x1, p2 * x2, p2 * x3), 0, _add8)


@triton.jit
def _plane_write(x, d, k, u, rs, J: tl.constexpr, ru_sc, MODE: tl.constexpr, ROUND: tl.constexpr):
    """Updated plane: decayed codes plus the rank-1 write (plus the stored residual, error feedback)."""
    s = d[:, None] * x + k[:, None] * u[None, :]
    if ROUND == 2:
        s = s + unpack_plane(rs, J, MODE) * ru_sc[:, None]
    return s


@triton.jit
def _decode8_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, alog_ptr, dtb_ptr, o_ptr,
    codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr, scale, n_tiles,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    FUSED: tl.constexpr, NEG_EIG: tl.constexpr, L2NORM: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
):
    """The decode step for int8/fp8 codes (see :mod:`gdn2q.kernels.packed`): one tile per (sequence, value
    head), walked by a persistent grid that loads the next tile's code words before updating this one."""
    W: tl.constexpr = V // 4
    ok = tl.arange(0, K)
    om = tl.arange(0, W)
    woffs = ok[:, None] * W + om[None, :]
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _, _, _, valid_n, head_n = _tile_of(pid, n_tiles, slots_ptr, HV, 1)
    wd_n, sc_n = _load_words(codes_ptr, scales_ptr, head_n, woffs, ok, valid_n, ROW, K, W)
    for t in range(pid, n_tiles, nprog):
        bi, hv, _, valid, head = _tile_of(t, n_tiles, slots_ptr, HV, 1)
        wd, sc = wd_n, sc_n
        _, _, _, valid_n, head_n = _tile_of(t + nprog, n_tiles, slots_ptr, HV, 1)
        wd_n, sc_n = _load_words(codes_ptr, scales_ptr, head_n, woffs, ok, valid_n, ROW, K, W)

        q, k, g, b = _key_vectors(q_ptr, k_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, bi, hv, scale, HQ, HV, K,
                                  FUSED, NEG_EIG, L2NORM)
        vbase = (bi * HV + hv) * V + om * 4
        d = sc * tl.exp(g)
        e = b * k * d
        p = q * d
        qk = tl.sum(q * k, axis=0)
        if MODE == 2:
            x0, x1, x2, x3 = unpack_plane(wd, 0, 2), unpack_plane(wd, 1, 2), unpack_plane(wd, 2, 2), \
                unpack_plane(wd, 3, 2)
        else:
            x0, x1, x2, x3 = unpack_fp8_word(wd)
        r0, r1, r2, r3, o0, o1, o2, o3 = _plane_reads(x0, x1, x2, x3, e, p)
        u0 = _value_gate(v_ptr, w_ptr, vbase + 0, FUSED) - r0
        u1 = _value_gate(v_ptr, w_ptr, vbase + 1, FUSED) - r1
        u2 = _value_gate(v_ptr, w_ptr, vbase + 2, FUSED) - r2
        u3 = _value_gate(v_ptr, w_ptr, vbase + 3, FUSED) - r3
        od = o_ptr.dtype.element_ty
        tl.store(o_ptr + vbase + 0, tl.where(valid, o0 + qk * u0, 0.0).to(od))
        tl.store(o_ptr + vbase + 1, tl.where(valid, o1 + qk * u1, 0.0).to(od))
        tl.store(o_ptr + vbase + 2, tl.where(valid, o2 + qk * u2, 0.0).to(od))
        tl.store(o_ptr + vbase + 3, tl.where(valid, o3 + qk * u3, 0.0).to(od))

        rs = 0
        if ROUND == 2:  # the residual words are read only now, so they don't hold registers through the reads
            rs = tl.load(res_ptr + head * (K * W) + woffs, mask=tile_mask(valid, woffs))
        ru_sc = sc * (INT8_RU if MODE == 2 else FP8_RU)
        s0 = _plane_write(x0, d, k, u0, rs, 0, ru_sc, MODE, ROUND)
        s1 = _plane_write(x1, d, k, u1, rs, 1, ru_sc, MODE, ROUND)
        s2 = _plane_write(x2, d, k, u2, rs, 2, ru_sc, MODE, ROUND)
        s3 = _plane_write(x3, d, k, u3, rs, 3, ru_sc, MODE, ROUND)
        qmax = INT8_QMAX if MODE == 2 else FP8_QMAX
        if STATIC:
            sc_new = tl.load(static_ptr + hv * (K if ROW else 1) + (ok if ROW else ok * 0))
        else:
            amax = tl.max(tl.maximum(tl.maximum(tl.abs(s0), tl.abs(s1)), tl.maximum(tl.abs(s2), tl.abs(s3))),
                          axis=1)
            if not ROW:
                amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
            sc_new = tl.maximum(amax, TINY) / qmax
        inv = (1.0 / sc_new)[:, None]
        y0, y1, y2, y3 = s0 * inv, s1 * inv, s2 * inv, s3 * inv
        m = tile_mask(valid, woffs)
        if MODE == 3 and ROUND == 0:
            wd_new = pack_fp8(y0, y1, y2, y3)
        else:
            rnd = (bi * HV + hv) * (K * V) + ok[:, None] * V + om[None, :] * 4
            seed = tl.load(seed_ptr)
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
                tl.store(res_ptr + head * (K * W) + woffs, pack_bytes(rb0, rb1, rb2, rb3), mask=m)
        tl.store(codes_ptr + head * (K * W) + woffs, wd_new, mask=m)
        if ROW:
            tl.store(scales_ptr + head * K + ok, sc_new, mask=tile_mask(valid, ok))
        else:
            tl.store(scales_ptr + head + ok * 0, sc_new, mask=tile_mask(valid, ok) & (ok == 0))


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


def decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, allow_neg_eigval: bool = False, scale: float | None = None,
    use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, num_warps: int | None = None,
    block_v: int | None = None, programs_per_sm: int | None = None,
) -> torch.Tensor:
    """Launch the decode kernel. q, k, g, b: [B, HQ, K]; v, w: [B, HV, V]; returns o [B, HV, V].

    num_warps / block_v / programs_per_sm override the launch heuristic (benchmark sweeps); quantized
    states need whole rows. The grid is persistent: at most programs_per_sm programs per multiprocessor.
    """
    B, HQ, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    fused = A_log is not None
    q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
    o = torch.empty_like(v) if out is None else out
    BV = V
    if block_v is not None:
        BV = block_v
    elif not fmt.quantized and B * HV < 256 and V > 32:  # few sequences: split V for more programs
        BV = 32
    if fmt.quantized and BV < V:
        raise ValueError("quantized states need whole rows per program (block_v >= V)")
    n_tiles = B * HV * (V // BV)
    stat = effective_static_scales(fmt, static_scales, HV, K, q.device)
    seeds = seed_tensor(fmt, seed, q.device)
    programs = _sm_count(q.device) * (programs_per_sm or PROGRAMS_PER_SM)
    args = (q, k, v, g, b, w, A_log if fused else q, dt_bias if fused else q, o)
    tail = (stat, slots, seeds, float(K ** -0.5 if scale is None else scale), n_tiles)
    meta = dict(HQ=HQ, HV=HV, K=K, V=V, FUSED=fused, NEG_EIG=allow_neg_eigval, L2NORM=use_qk_l2norm,
                num_warps=num_warps or 4, num_stages=1, **format_constexprs(fmt))
    if fmt.quantized:   # code words: four int8/fp8 codes per int32
        words = pool.codes.view(torch.int32)
        res = pool.residual.view(torch.int32) if pool.residual is not None else words
        _decode8_kernel[(min(n_tiles, programs),)](*args, words, pool.scales, res, *tail, **meta)
    else:
        _decode_kernel[(min(n_tiles, programs),)](*args, pool.codes, pool.codes, pool.codes, *tail, BV=BV, **meta)
    return o


PROGRAMS_PER_SM = 2     # resident programs per multiprocessor at 4 warps (the quantized kernel uses ~200 registers)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the interpreter: 4, enough to exercise the persistent loop)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
