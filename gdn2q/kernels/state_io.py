"""Triton helpers that read and write one (sequence, value head) state tile in a stored format.

They implement the formats of :mod:`gdn2q.quant.state` (codes, per-row or per-head fp32 scales,
nearest / stochastic / error-feedback rounding, dynamic or static scales), so every kernel that touches the
state pool shares one copy of the rounding rules. Tiles are whole powers of two (no masks). Two deliberate
differences from the PyTorch reference, both within one step of the grid: codes are ``x * (1 / scale)``
rather than ``x / scale`` (one reciprocal per row instead of a division per element), and the int8
residual is ``err * 254`` rather than ``err / fp32(1/254)``. Rounding avoids libdevice (the Triton CPU
interpreter used in CI has no ``rint``).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from gdn2q.quant.state import QMAX, RESIDUAL_UNIT, StateQuantConfig

MODES = {"fp32": 0, "bf16": 1, "int8": 2, "fp8": 3}
ROUNDINGS = {"nearest": 0, "stochastic": 1, "error-feedback": 2}
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
TINY: tl.constexpr = tl.constexpr(1e-30)
RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)       # 1.5 * 2^23: (y + M) - M rounds y half-to-even
RNE_MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B400000)  # its fp32 bit pattern
INT8_QMAX: tl.constexpr = tl.constexpr(QMAX["int8"])
FP8_QMAX: tl.constexpr = tl.constexpr(QMAX["fp8"])
INT8_RU: tl.constexpr = tl.constexpr(RESIDUAL_UNIT["int8"])
INT8_INV_RU: tl.constexpr = tl.constexpr(1.0 / RESIDUAL_UNIT["int8"])
FP8_RU: tl.constexpr = tl.constexpr(RESIDUAL_UNIT["fp8"])


def format_constexprs(fmt: StateQuantConfig) -> dict[str, int]:
    """The constexpr arguments every state-touching kernel takes for ``fmt``."""
    return {"MODE": MODES[fmt.dtype], "ROW": int(fmt.granularity == "row"),
            "ROUND": ROUNDINGS[fmt.rounding], "STATIC": int(fmt.scales == "static")}


@triton.jit
def rne(y):
    """Round half to even, as torch.round does, for |y| < 2^22."""
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def fp8_ulp(y):
    """Spacing of the e4m3 grid at |y| (2^-9 below 2^-6), from the exponent bits (exact, unlike log2)."""
    a = tl.maximum(tl.abs(y), 0.015625)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return ((e - 3) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_codes(y, u, MODE: tl.constexpr, ROUND: tl.constexpr, CLAMP: tl.constexpr):
    """Codes (fp32 values on the grid) for y in code units; u is uniform [0, 1) noise (stochastic only).

    CLAMP=False skips the int8 clamp where |y| <= 127 by construction (dynamic absmax scales).
    """
    if MODE == 2:
        if ROUND == 1:
            c = tl.floor(y + u)
        else:
            c = rne(y)
        if CLAMP:
            c = tl.minimum(tl.maximum(c, -INT8_QMAX), INT8_QMAX)
    else:
        if ROUND == 1:
            y = y + (u - 0.5) * fp8_ulp(y)
        y = tl.minimum(tl.maximum(y, -FP8_QMAX), FP8_QMAX)
        if INTERPRETED:  # the interpreter's cast drops the carry into the exponent: round on the grid first
            ulp = fp8_ulp(y)
            y = rne(y / ulp) * ulp
        c = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    return c


@triton.jit
def _row_vector(ptr, ok, ROW: tl.constexpr):
    """Per-row fp32 values [BK]: ptr[ok] (row granularity) or ptr[0] broadcast (head granularity)."""
    if ROW:
        x = tl.load(ptr + ok)
    else:
        x = tl.load(ptr) + tl.zeros(ok.shape, dtype=tl.float32)
    return x


@triton.jit
def tile_mask(valid, offs):
    """The scalar ``valid`` as a load/store mask for offs (the interpreter needs a full-shape array; compiled
    code keeps the scalar, which predicates whole vector accesses)."""
    if INTERPRETED:
        valid = offs < valid.to(tl.int32) * (1 << 30)
    return valid


@triton.jit
def codes_to_float(c, MODE: tl.constexpr):
    """Stored codes as fp32 values on their grid.

    int8 goes through the float bit pattern of 1.5 * 2^23 + c (an integer add and a float subtract, both on
    full-rate pipes) instead of the conversion unit, which runs at an eighth of the FMA rate on Hopper and
    would otherwise bound the whole decode step.
    """
    if MODE == 2:
        x = (c.to(tl.int32) + RNE_MAGIC_BITS).to(tl.float32, bitcast=True) - RNE_MAGIC
    else:
        x = c.to(tl.float32)
    return x


@triton.jit
def _int8_rne(y):
    """int8 codes of y (|y| <= 127.5, rounded half to even): the low byte of the bits of y + 1.5 * 2^23."""
    return (y + RNE_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def load_codes(codes_ptr, scales_ptr, offs, ok, MODE: tl.constexpr, ROW: tl.constexpr):
    """(codes as fp32 [BK, BV], per-row scales [BK]); the state is codes * scales[:, None] (scales 1 unquantized).

    codes_ptr/scales_ptr point at this tile's first code and first scale; offs are [BK, BV] tile offsets.
    """
    c = codes_to_float(tl.load(codes_ptr + offs), MODE)
    if MODE >= 2:
        sc = _row_vector(scales_ptr, ok, ROW)
    else:
        sc = tl.full(ok.shape, 1.0, dtype=tl.float32)
    return c, sc


@triton.jit
def store_state(x, sc_prev, codes_ptr, scales_ptr, res_ptr, static_ptr, offs, ok, seed, rnd_base,
                MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr):
    """Store the fp32 tile x [BK, BV] (whole rows when quantized) in the pool's format.

    sc_prev is the row scales the tile was loaded with: error feedback adds the residual still in memory (in
    units of sc_prev * RESIDUAL_UNIT) back before rounding. static_ptr points at this head's scales.
    """
    if MODE == 0:
        tl.store(codes_ptr + offs, x)
    elif MODE == 1:
        tl.store(codes_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtne"))
    else:
        if MODE == 2:
            qmax = INT8_QMAX
            ru = INT8_RU
        else:
            qmax = FP8_QMAX
            ru = FP8_RU
        if ROUND == 2:
            x = x + tl.load(res_ptr + offs).to(tl.float32) * (sc_prev * ru)[:, None]
        if STATIC:
            sc = _row_vector(static_ptr, ok, ROW)
        else:
            amax = tl.max(tl.abs(x), axis=1)
            if not ROW:
                amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
            sc = tl.maximum(amax, TINY) / qmax
        y = x * (1.0 / sc)[:, None]
        if MODE == 2 and ROUND != 1:
            if STATIC:
                y = tl.minimum(tl.maximum(y, -INT8_QMAX), INT8_QMAX)
            codes = _int8_rne(y)
            tl.store(codes_ptr + offs, codes)
            if ROUND == 2:
                c = codes_to_float(codes, MODE)
        else:
            u = y
            if ROUND == 1:
                u = tl.rand(seed, rnd_base + offs)
            c = _round_codes(y, u, MODE, ROUND, STATIC or ROUND == 1)
            if MODE == 2:
                tl.store(codes_ptr + offs, c.to(tl.int8))
            else:
                tl.store(codes_ptr + offs, c.to(tl.float8e4nv))
        if ROW:
            tl.store(scales_ptr + ok, sc)
        else:
            tl.store(scales_ptr + ok * 0, sc, mask=ok == 0)
        if ROUND == 2:
            if MODE == 2:
                tl.store(res_ptr + offs, _int8_rne((y - c) * INT8_INV_RU))
            else:
                rc = _round_codes(y - c, y, MODE, 0, True)
                tl.store(res_ptr + offs, rc.to(tl.float8e4nv))
