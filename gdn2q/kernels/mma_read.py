"""Tensor-core erase and output reads of an int8/fp8 state tile: pass 1 of the decode kernel.

Pass 1 of the quantized decode step is two vector-matrix products over the stored codes X [K, V]:
r = e^T X (erase read) and o = p^T X (output read), with per-row weights e and p. Done with FMAs, each code
costs an unpack and two multiply-adds, a third of the kernel's instructions. Here the codes go through the
tensor cores instead, one warp per tile, in blocks of 32 key rows:

- int8 codes are the A operand of ``mma.sync.m16n8k32`` int8 (exact int32 sums) against the weights split
  into three int8 digits each, e ~ s (d0 + d1 / 254 + d2 / 254^2), which is fp32-accurate; the digits of
  e and p fill six of the instruction's eight N columns;
- fp8 codes are converted to f16 two at a time (exact) and multiply f16 hi + lo weights scaled to
  [-256, 256] (``mma.sync.m16n8k16``, fp32 sums).

Why by hand: the MMA wants four keys of one column per register, while a stored word holds four columns of
one key, and ``tl.dot`` makes that transpose through shared memory one byte at a time. Here the block is
loaded as plain coalesced [32, 32] words (so Triton can stream it through shared memory), one shuffle per
word moves it to the lanes the MMA wants (rows by thread-in-group, columns by group), each 4x4 byte block
is transposed in registers (eight ``prmt`` per 16 codes) and the MMA runs in inline PTX. This relies on
the layout Triton gives a 16-byte-vector load of [32, 32] int32 with one warp: lane 8 a + b holds rows
a + 4 rep, words 4 b + 0..3, in register 4 rep + word. The GPU check (tools/gpu_check_kernels.py) guards
that assumption; under the CPU interpreter, which has no lanes or PTX, a twin computes every accumulator
element from its definition, which tests the staging, the index maps and the combination in CI.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gdn2q.kernels.state_io import INTERPRETED, TINY, rne

BLOCK: tl.constexpr = tl.constexpr(32)    # key rows per block: the int8 MMA's K
DIGIT_BASE: tl.constexpr = tl.constexpr(254.0)


def _transpose_ptx(q: int, v: int) -> list[str]:
    """PTX of one 4x4 byte transpose: word v of the four rows of quad q (registers w[v + 16 q + 4 i]) into
    t[16 q + 4 v + j], holding column j of the four rows (byte i = row i)."""
    r = [f"w{v + 16 * q + 4 * i}" for i in range(4)]
    t = [f"t{16 * q + 4 * v + j}" for j in range(4)]
    return [f"prmt.b32 x0, {r[0]}, {r[1]}, 0x5140;", f"prmt.b32 x1, {r[0]}, {r[1]}, 0x7362;",
            f"prmt.b32 y0, {r[2]}, {r[3]}, 0x5140;", f"prmt.b32 y1, {r[2]}, {r[3]}, 0x7362;",
            f"prmt.b32 {t[0]}, x0, y0, 0x5410;", f"prmt.b32 {t[1]}, x0, y0, 0x7632;",
            f"prmt.b32 {t[2]}, x1, y1, 0x5410;", f"prmt.b32 {t[3]}, x1, y1, 0x7632;"]


def _block_ptx(fp8: bool) -> str:
    """Inline PTX of one block: operands $0-31 accumulators out, $32-63 the words, $64-95 accumulators in,
    $96 the address of this block's staged weights. First every word moves from lane 8 (l % 4) + l // 4 to
    lane l, so that lane (g, t) holds the rows of thread-in-group t and the words of group g. Accumulator
    register 4m + c is the C fragment element c of MMA m = 2v + jp (word v, column pair jp)."""
    lines = ["{", ".reg .b32 x0, x1, y0, y1, ln, src, b<4>, t<32>, w<32>;", ".reg .b64 ad;", ".reg .b16 h<4>;",
             "mov.u32 ln, %laneid;", f"mul.wide.u32 ad, ln, {16 if fp8 else 8};", "add.s64 ad, ad, $96;",
             "ld.global.v4.b32 {b0, b1, b2, b3}, [ad];" if fp8 else "ld.global.v2.b32 {b0, b1}, [ad];",
             "and.b32 src, ln, 3;", "shr.u32 x0, ln, 2;", "mad.lo.u32 src, src, 8, x0;"]
    lines += [f"shfl.sync.idx.b32 w{k}, ${32 + k}, src, 0x1f, 0xffffffff;" for k in range(32)]
    for q in range(2):
        for v in range(4):
            lines += _transpose_ptx(q, v)
    for v in range(4):
        for jp in range(2):
            m = 2 * v + jp
            d = ", ".join(f"${4 * m + c}" for c in range(4))
            c_in = ", ".join(f"${64 + 4 * m + c}" for c in range(4))
            lo, hi = 4 * v + 2 * jp, 4 * v + 2 * jp + 1          # columns m = g and m = g + 8
            if not fp8:
                lines.append(f"mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {{{d}}}, "
                             f"{{t{lo}, t{hi}, t{16 + lo}, t{16 + hi}}}, {{b0, b1}}, {{{c_in}}};")
                continue
            for q in range(2):   # f16 pairs: keys (0, 1) of the quad as k = 2t.., keys (2, 3) as k = 2t + 8..
                lines += [f"mov.b32 {{h0, h1}}, t{16 * q + lo};", f"mov.b32 {{h2, h3}}, t{16 * q + hi};",
                          "cvt.rn.f16x2.e4m3x2 x0, h0;", "cvt.rn.f16x2.e4m3x2 x1, h2;",
                          "cvt.rn.f16x2.e4m3x2 y0, h1;", "cvt.rn.f16x2.e4m3x2 y1, h3;",
                          f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{x0, x1, y0, y1}}, "
                          f"{{b{2 * q}, b{2 * q + 1}}}, {{{d if q else c_in}}};"]
    lines.append("}")
    return "\n".join(lines)


INT8_BLOCK_PTX: tl.constexpr = tl.constexpr(_block_ptx(fp8=False))
FP8_BLOCK_PTX: tl.constexpr = tl.constexpr(_block_ptx(fp8=True))
INT8_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 32 + ["r"] * 64 + ["l"] * 32))
FP8_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=f"] * 32 + ["r"] * 32 + ["f"] * 32 + ["l"] * 32))


@triton.jit
def _lane_map():
    """(i, j, g, t, rep) of the [32, 32] block: MMA group and thread-in-group of each element's lane, and the
    element's repetition (register // 4) in that lane."""
    i = tl.arange(0, 32)[:, None]
    j = tl.arange(0, 32)[None, :]
    return i, j, 2 * (i % 4) + j // 16, (j // 4) % 4, i // 4


@triton.jit
def block_offsets(W: tl.constexpr):
    """Word offsets of a block of 32 rows, loaded as [32, 32] words (coalesced: lane 8 a + b holds rows
    a + 4 rep, words 4 b + 0..3; the PTX block moves them to the MMA's lanes)."""
    return tl.arange(0, 32)[:, None] * W + tl.arange(0, 32)[None, :]


@triton.jit
def _acc_map():
    """(column, digit column n) of each accumulator element: C fragment element c = j % 4 of MMA m = i // 4
    in lane (g, t) is D[g + 8 (c // 2)][2 t + c % 2], and A row g (+8) is column 16 g + 4 v + 2 jp (+1)."""
    i, j, g, t, rep = _lane_map()
    c = j % 4
    return 16 * g + 4 * (rep // 2) + 2 * (rep % 2) + c // 2, 2 * t + c % 2


@triton.jit
def _digit_index(r, n):
    """Element index of row r's weight digit n in the staged digits: the 8 (int8) or 16 (fp8) bytes lane
    4 n + t reads per block hold its rows t + 4 i (i = 0..3, quad 0) then t + 16 + 4 i (quad 1)."""
    rr = r % 32
    return (r // 32) * 256 + (4 * n + rr % 4) * 8 + (rr // 16) * 4 + (rr // 4) % 4


@triton.jit
def _stage_int8_digits(d8, x, ok, N0: tl.constexpr):
    """Digit columns N0..N0+3 of weights x (int8): x ~ s (d0 + d1/254 + d2/254^2), |d| <= 127; returns s."""
    s = tl.maximum(tl.max(tl.abs(x), axis=0), TINY)
    u = x * (127.0 / s)
    d0 = rne(u)
    u1 = (u - d0) * DIGIT_BASE
    d1 = rne(u1)
    d2 = rne((u1 - d1) * DIGIT_BASE)
    tl.store(d8 + _digit_index(ok, N0), d0.to(tl.int8))
    tl.store(d8 + _digit_index(ok, N0 + 1), d1.to(tl.int8))
    tl.store(d8 + _digit_index(ok, N0 + 2), d2.to(tl.int8))
    tl.store(d8 + _digit_index(ok, N0 + 3), tl.zeros_like(d0).to(tl.int8))
    return s / 127.0


@triton.jit
def _stage_f16_digits(d16, x, ok, N0: tl.constexpr):
    """Digit columns N0..N0+3 of weights x (f16): x ~ s (hi + lo), |hi| <= 256, then two zero columns."""
    s = tl.maximum(tl.max(tl.abs(x), axis=0), TINY)
    u = x * (256.0 / s)
    hi = u.to(tl.float16)
    tl.store(d16 + _digit_index(ok, N0), hi)
    tl.store(d16 + _digit_index(ok, N0 + 1), (u - hi.to(tl.float32)).to(tl.float16))
    tl.store(d16 + _digit_index(ok, N0 + 2), tl.zeros_like(hi))
    tl.store(d16 + _digit_index(ok, N0 + 3), tl.zeros_like(hi))
    return s / 256.0


@triton.jit
def stage_digits(dig_ptr, e, p, ok, MODE: tl.constexpr):
    """Stage the weights e, p [K] as MMA operands at dig_ptr (per program, 16 K bytes); returns their scales.

    int8 (MODE 2): digit columns [e0, e1, e2, 0, p0, p1, p2, 0], int8 (exact int32 sums, fp32-accurate).
    fp8 (MODE 3): [e_hi, e_lo, 0, 0, p_hi, p_lo, 0, 0], f16.
    """
    if MODE == 2:
        se = _stage_int8_digits(dig_ptr.to(tl.pointer_type(tl.int8)), e, ok, 0)
        sp = _stage_int8_digits(dig_ptr.to(tl.pointer_type(tl.int8)), p, ok, 4)
    else:
        se = _stage_f16_digits(dig_ptr.to(tl.pointer_type(tl.float16)), e, ok, 0)
        sp = _stage_f16_digits(dig_ptr.to(tl.pointer_type(tl.float16)), p, ok, 4)
    return se, sp


@triton.jit
def read_block(wd, acc, tile_words, dig_ptr, blk, valid, W: tl.constexpr, MODE: tl.constexpr):
    """acc + this block's products: element (column c, digit column n) gains sum over the block's 32 rows of
    code[row, c] * digit_n[row]. wd is the block's words loaded at ``block_offsets``."""
    if INTERPRETED:   # the definition, element by element (no lanes, no PTX in the interpreter)
        col, n = _acc_map()
        row = blk * 32 + tl.arange(0, 32)[:, None, None]
        word = tl.load(tile_words + row * W + (col // 4)[None], mask=(row < (valid.to(tl.int32) << 20)), other=0)
        byte = (word >> (8 * (col % 4))[None]) & 0xFF
        if MODE == 2:
            x = (byte ^ 0x80) - 0x80
            dig = tl.load(dig_ptr.to(tl.pointer_type(tl.int8)) + _digit_index(row, n[None])).to(tl.int32)
        else:
            x = byte.to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            dig = tl.load(dig_ptr.to(tl.pointer_type(tl.float16)) + _digit_index(row, n[None])).to(tl.float32)
        acc = acc + tl.sum(x * dig, axis=0)
    else:
        elems = (dig_ptr.to(tl.pointer_type(tl.int8)) + blk * (256 if MODE == 2 else 512)).to(tl.int64)
        if MODE == 2:
            acc = tl.inline_asm_elementwise(INT8_BLOCK_PTX, INT8_CONSTRAINTS, [wd, acc, elems], dtype=tl.int32,
                                            is_pure=True, pack=32)
        else:
            acc = tl.inline_asm_elementwise(FP8_BLOCK_PTX, FP8_CONSTRAINTS, [wd, acc, elems], dtype=tl.float32,
                                            is_pure=True, pack=32)
    return acc


@triton.jit
def _digit_units(n, se, sp, MODE: tl.constexpr):
    """The value of one unit of digit column n: its digit weight times the scale of e (n < 4) or p."""
    m = n % 4
    if MODE == 2:
        unit = tl.where(m == 0, 1.0, tl.where(m == 1, 1.0 / DIGIT_BASE, 1.0 / (DIGIT_BASE * DIGIT_BASE)))
    else:
        unit = tl.where(m < 2, 1.0, 0.0)
    return tl.where(m == 3, 0.0, unit) * tl.where(n < 4, se, sp)


@triton.jit
def reads(acc, se, sp, MODE: tl.constexpr):
    """(r0..r3, o0..o3): the erase and output reads of the four code planes, [V/4] each, from the accumulators.

    Pure Triton (Triton moves the values between lanes): accumulator element (i, j) is, by ``_acc_map``,
    i = g_hi + 4 jp + 8 v and j = c_lo + 2 c_hi + 4 t_lo + 8 t_hi + 16 g_lo, for column 4 (4 g + v) + 2 jp + c_hi
    and digit column 4 t_hi + 2 t_lo + c_lo (g = 2 g_hi + g_lo). Summing t_lo and c_lo adds up the digits.
    """
    col, n = _acc_map()
    x = acc.to(tl.float32) * _digit_units(n, se, sp, MODE)
    x = tl.sum(tl.sum(tl.reshape(x, [4, 2, 4, 2, 2, 2, 2, 2]), axis=7), axis=5)   # v jp g_hi g_lo t_hi c_hi
    x = tl.reshape(tl.permute(x, [2, 3, 0, 4, 1, 5]), [32, 2, 2, 2])             # word m, t_hi, jp, c_hi
    x0, x1 = tl.split(x)                                                         # c_hi
    x00, x10 = tl.split(x0)                                                      # jp
    x01, x11 = tl.split(x1)
    r0, o0 = tl.split(x00)                                                       # t_hi: erase or output read
    r1, o1 = tl.split(x01)
    r2, o2 = tl.split(x10)
    r3, o3 = tl.split(x11)
    return r0, r1, r2, r3, o0, o1, o2, o3
