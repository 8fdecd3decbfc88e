"""The Gluon kernel's int8 codec (packed.py's f16x2 unpack and IMAD pack, used by decode_staged.py) on every
code, through a small emulator of the few PTX instructions it uses. Gluon has no CPU interpreter, so CI cannot run
that PTX; the emulator reads the kernel's own asm text, so a wrong selector or constant fails here and not only on
a GPU."""

from __future__ import annotations

import re
from functools import partial

import numpy as np

from gdn2q.kernels.packed import INT8_BIAS, PACK_INT8_MAD_PTX, UNPACK_INT8_F16_PTX


def _operand(regs: dict[str, np.ndarray], tok: str) -> np.ndarray:
    """A register's value, or an immediate broadcast to the registers' shape."""
    return regs[tok] if tok in regs else np.full_like(next(iter(regs.values())), np.uint32(int(tok, 0)))


def _run_ptx(ptx: str, regs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the asm block's instructions on uint32 (or uint16 halves) arrays; $N operands come in regs."""
    body = ptx.strip().lstrip("{").rstrip("}")
    val = partial(_operand, regs)
    for stmt in (s.strip() for s in body.split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        a = [t.strip() for t in re.split(r",(?![^{]*})", args)]
        if op == "xor.b32":
            regs[a[0]] = val(a[1]) ^ val(a[2])
        elif op == "mov.b32" and a[0].startswith("{"):       # split a word into its 16-bit halves
            lo, hi = (t.strip() for t in a[0].strip("{}").split(","))
            regs[lo], regs[hi] = val(a[1]) & 0xFFFF, val(a[1]) >> 16
        elif op == "mov.b32":
            regs[a[0]] = val(a[1]).astype(np.uint32)
        elif op == "prmt.b32":                                 # default mode: a selector nibble per result byte
            src = val(a[1]).astype(np.uint64) | (val(a[2]).astype(np.uint64) << 32)
            sel = int(a[3], 0)
            out = np.zeros_like(val(a[1]))
            for i in range(4):
                out |= (((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF).astype(np.uint32)) << (8 * i)
            regs[a[0]] = out
        elif op == "sub.rn.f16x2":
            x = val(a[1]).astype(np.uint32).view(np.float16).reshape(-1, 2)
            y = val(a[2]).astype(np.uint32).view(np.float16).reshape(-1, 2)
            regs[a[0]] = (x - y).astype(np.float16).reshape(-1).view(np.uint32)
        elif op == "cvt.f32.f16":
            regs[a[0]] = val(a[1]).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        elif op == "mad.lo.u32":
            regs[a[0]] = (val(a[1]).astype(np.uint64) * int(val(a[2])[0]) + val(a[3])).astype(np.uint32)
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return regs


def test_unpack_gives_every_code_in_every_byte():
    rng = np.random.default_rng(0)
    codes = np.concatenate([np.arange(-128, 128), rng.integers(-128, 128, 4096)]).astype(np.int8)
    words = np.stack([np.roll(codes, j) for j in range(4)], axis=1)            # [n, 4] bytes of each word
    word = words.copy().view(np.uint32).reshape(-1)
    regs = _run_ptx(UNPACK_INT8_F16_PTX.value, {"$4": word})
    got = np.stack([regs[f"${j}"].view(np.float32) for j in range(4)], axis=1)
    np.testing.assert_array_equal(got, words.astype(np.float32))


def test_pack_rounds_half_to_even_and_stores_twos_complement_bytes():
    """Planes arrive as fp32 2^23 + 128 + y rounded to nearest even (the kernel's fma), |y| <= 127."""
    rng = np.random.default_rng(1)
    y = np.concatenate([np.arange(-127, 128) + 0.5 * (np.arange(255) % 3 - 1), rng.uniform(-127, 127, 8192)])
    y = np.clip(y, -127, 127).astype(np.float32)[: 4 * (len(y) // 4)].reshape(-1, 4)
    planes = (np.float32(INT8_BIAS.value) + y).astype(np.float32)          # one rounding at ulp 1, as the fma's
    regs = _run_ptx(PACK_INT8_MAD_PTX.value, {f"${j + 1}": planes[:, j].view(np.uint32).copy() for j in range(4)})
    got = regs["$0"].view(np.int8).reshape(-1, 4)
    np.testing.assert_array_equal(got, np.round(y).astype(np.int8))   # numpy rounds half to even
