"""8-bit state codes handled as 32-bit words: four columns per word, one *plane* per byte position.

Why by hand: a [K, V] tile of int8/fp8 codes that Triton keeps as 8-bit tensors costs three to four byte
permutes (PRMT) per element once the tile is carried across a loop iteration, and its int8 <-> fp32
conversions run on the conversion unit at an eighth of the FMA rate. Loading the tile as int32 words
[K, V/4] and working on the four byte planes separately (plane j holds columns 4m + j) keeps every access
16 bytes wide and turns the conversions into integer/float bit tricks on full-rate pipes. On the GPU the byte
(un)packing uses ``prmt``/``cvt`` PTX through ``tl.inline_asm_elementwise``; the Triton CPU interpreter (CI)
cannot run PTX, so it takes the equivalent pure Triton expressions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gdn2q.kernels.state_io import FP8_QMAX, INT8_QMAX, INTERPRETED, RNE_MAGIC, fp8_ulp, rne

INT8_BIAS: tl.constexpr = tl.constexpr(8388736.0)         # 2^23 + 128: float of bits 0x4B000000 | (c ^ 0x80)

# The PTX of the word (un)packing, shared with the Gluon kernel of decode_staged.py (Gluon cannot call
# @triton.jit functions, but takes the same asm text). Operands: $0-$3 the four planes, $4 the word (unpack);
# $0 the word, $1-$4 the planes (pack).
UNPACK_INT8_PTX: tl.constexpr = tl.constexpr(
    """{ .reg .b32 x, c;
    xor.b32 x, $4, 0x80808080;
    mov.b32 c, 0x4B000000;
    prmt.b32 $0, x, c, 0x7440;
    prmt.b32 $1, x, c, 0x7441;
    prmt.b32 $2, x, c, 0x7442;
    prmt.b32 $3, x, c, 0x7443; }""")
# the tail of both f16 unpacks: the f16 pairs in p0 (planes 0, 1) and p1 (planes 2, 3) to four fp32 planes
_F16_PAIRS_TO_F32 = """
    mov.b32 {a, b}, p0;
    mov.b32 {c, d}, p1;
    cvt.f32.f16 $0, a;
    cvt.f32.f16 $1, b;
    cvt.f32.f16 $2, c;
    cvt.f32.f16 $3, d; }"""
UNPACK_FP8_PTX: tl.constexpr = tl.constexpr(
    """{ .reg .b16 l, h, a, b, c, d; .reg .b32 p0, p1;
    mov.b32 {l, h}, $4;
    cvt.rn.f16x2.e4m3x2 p0, l;
    cvt.rn.f16x2.e4m3x2 p1, h;""" + _F16_PAIRS_TO_F32)
# The Gluon kernel's int8 codec leans on the FMA pipe: the ALU pipe issues at half its rate and carries pass 2's
# absmax (`fmnmx`) already. Unpack: one xor per word and one prmt per two codes give the f16 pair
# 1024 + (code + 128), an f16x2 subtract leaves the codes, conversions to fp32 (FMA pipe): 3 ALU operations a
# word instead of UNPACK_INT8_PTX's 5. Pack: each plane as the fp32 2^23 + 128 + round(y) (bits 0x4B000000 + the
# biased code), two IMADs join the pairs (y1 * 256 + y0: y1's exponent bits fall off the top), one prmt the
# halves, one xor unbiases: 2 ALU operations instead of PACK_BYTES_PTX's 3. Same codes bit for bit; H200,
# B=256: 48.2-48.4 against 49.0-49.2 µs (docs/kernels.md).
UNPACK_INT8_F16_PTX: tl.constexpr = tl.constexpr(
    """{ .reg .b32 x, k, m, p0, p1; .reg .b16 a, b, c, d;
    xor.b32 x, $4, 0x80808080;
    mov.b32 k, 0x64646464;
    mov.b32 m, 0x64806480;
    prmt.b32 p0, x, k, 0x4140;
    prmt.b32 p1, x, k, 0x4342;
    sub.rn.f16x2 p0, p0, m;
    sub.rn.f16x2 p1, p1, m;""" + _F16_PAIRS_TO_F32)
PACK_INT8_MAD_PTX: tl.constexpr = tl.constexpr(   # each plane as the fp32 2^23 + 128 + code
    """{ .reg .b32 lo, hi;
    mad.lo.u32 lo, $2, 256, $1;
    mad.lo.u32 hi, $4, 256, $3;
    prmt.b32 lo, lo, hi, 0x5410;
    xor.b32 $0, lo, 0x80808080; }""")
PACK_BYTES_PTX: tl.constexpr = tl.constexpr(   # the low bytes of four registers, $1 lowest
    """{ .reg .b32 lo, hi;
    prmt.b32 lo, $1, $2, 0x40;
    prmt.b32 hi, $3, $4, 0x40;
    prmt.b32 $0, lo, hi, 0x5410; }""")
PACK_FP8_PTX: tl.constexpr = tl.constexpr(     # e4m3, round to nearest even, saturating
    """{ .reg .b16 lo, hi;
    cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
    cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
    mov.b32 $0, {lo, hi}; }""")


@triton.jit
def unpack_plane(wd, J: tl.constexpr, MODE: tl.constexpr):
    """fp32 values of the codes in byte J of each word (MODE 2: int8, 3: fp8 e4m3)."""
    if MODE == 2:
        x = (((wd >> (8 * J)) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - INT8_BIAS
    else:
        x = ((wd >> (8 * J)) & 0xFF).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return x


@triton.jit
def unpack_int8_word(wd):
    """The four int8 codes of each word as fp32: one xor per word flips the sign bits, then one ``prmt`` per
    code builds the float 2^23 + 128 + code, and a subtract leaves the code (2.25 ops per code, against 2.75
    for shift + mask + subtract)."""
    if INTERPRETED:
        x0, x1, x2, x3 = unpack_plane(wd, 0, 2), unpack_plane(wd, 1, 2), unpack_plane(wd, 2, 2), unpack_plane(wd, 3, 2)
    else:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            UNPACK_INT8_PTX, "=r,=r,=r,=r,r", [wd], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
            pack=1)
        x0 = b0.to(tl.float32, bitcast=True) - INT8_BIAS
        x1 = b1.to(tl.float32, bitcast=True) - INT8_BIAS
        x2 = b2.to(tl.float32, bitcast=True) - INT8_BIAS
        x3 = b3.to(tl.float32, bitcast=True) - INT8_BIAS
    return x0, x1, x2, x3


@triton.jit
def unpack_fp8_word(wd):
    """The four e4m3 codes of each word as fp32 (two paired hardware conversions per word on the GPU)."""
    if INTERPRETED:
        x0, x1, x2, x3 = unpack_plane(wd, 0, 3), unpack_plane(wd, 1, 3), unpack_plane(wd, 2, 3), unpack_plane(wd, 3, 3)
    else:
        x0, x1, x2, x3 = tl.inline_asm_elementwise(
            UNPACK_FP8_PTX, "=f,=f,=f,=f,r", [wd], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    return x0, x1, x2, x3


@triton.jit
def pack_bytes(b0, b1, b2, b3):
    """One word from the low bytes of four int32 tensors (b0 lowest)."""
    if INTERPRETED:
        wd = (b0 & 0xFF) | ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | (b3 << 24)
    else:
        wd = tl.inline_asm_elementwise(
            PACK_BYTES_PTX, "=r,r,r,r,r", [b0, b1, b2, b3], dtype=tl.int32, is_pure=True, pack=1)
    return wd


@triton.jit
def code_byte(y, u, MODE: tl.constexpr, ROUND: tl.constexpr, CLAMP: tl.constexpr):
    """(int32 whose low byte is the code of y, the code as fp32) for y in code units.

    ROUND: 0 nearest (half to even), 1 stochastic with uniform noise u, 2 nearest (error feedback). CLAMP
    is needed only where |y| can exceed the grid (static scales, stochastic noise). int8 rounds by adding
    1.5 * 2^23, whose sum carries the code in its low byte; fp8 casts with saturation (e4m3 has no inf).
    """
    if MODE == 2:
        if ROUND == 1:
            y = tl.floor(y + u)
        if CLAMP:
            y = tl.minimum(tl.maximum(y, -INT8_QMAX), INT8_QMAX)
        f = y + RNE_MAGIC
        bits = f.to(tl.int32, bitcast=True)
        c = f - RNE_MAGIC
    else:
        if ROUND == 1:
            y = y + (u - 0.5) * fp8_ulp(y)
        if INTERPRETED:  # the interpreter's cast drops the carry into the exponent: round on the grid first
            y = tl.minimum(tl.maximum(y, -FP8_QMAX), FP8_QMAX)
            ulp = fp8_ulp(y)
            y = rne(y / ulp) * ulp
        e = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        bits = e.to(tl.int8, bitcast=True).to(tl.int32)
        c = e.to(tl.float32)
    return bits, c


@triton.jit
def pack_fp8(y0, y1, y2, y3):
    """Word of the four e4m3 codes (round to nearest even, saturating) of four fp32 planes."""
    if INTERPRETED:
        wd = pack_bytes(code_byte(y0, y0, 3, 0, False)[0], code_byte(y1, y1, 3, 0, False)[0],
                        code_byte(y2, y2, 3, 0, False)[0], code_byte(y3, y3, 3, 0, False)[0])
    else:
        wd = tl.inline_asm_elementwise(
            PACK_FP8_PTX, "=r,f,f,f,f", [y0, y1, y2, y3], dtype=tl.int32, is_pure=True, pack=1)
    return wd
