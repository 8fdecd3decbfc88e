"""Fused Triton decode step: one token for B sequences whose states live in a slot-indexed pool.

One program owns one (sequence, value head) state tile [K, V]: it reads the stored tile once, applies the
whole step of GDN2_SPEC.md 1.3 in fp32 registers (optionally computing the gates from pre-activations and
L2-normalising q/k), writes the output and stores the tile back in place in the pool's format. The state is
the only large operand, so the step moves ~2x the stored state bytes and nothing else.
Quantized formats need whole rows per program (row absmax); fp32/bf16 may split V across programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2q.kernels.state_io import format_constexprs, load_codes, store_state
from gdn2q.quant.state import QuantizedState, StateQuantConfig


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, linear above 20), without libdevice log1p."""
    sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
    sp = tl.where(x < -15.0, tl.exp(x), sp)
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, w_ptr, alog_ptr, dtb_ptr, o_ptr,
    codes_ptr, scales_ptr, res_ptr, static_ptr, slots_ptr, seed_ptr, scale,
    HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    FUSED: tl.constexpr, NEG_EIG: tl.constexpr, L2NORM: tl.constexpr,
    MODE: tl.constexpr, ROW: tl.constexpr, ROUND: tl.constexpr, STATIC: tl.constexpr,
):
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    bi = pid // HV
    hv = pid % HV
    hq = hv // (HV // HQ)
    ok = tl.arange(0, K)
    ov = pv * BV + tl.arange(0, BV)
    qk_off = (bi * HQ + hq) * K + ok
    q = tl.load(q_ptr + qk_off).to(tl.float32)
    k = tl.load(k_ptr + qk_off).to(tl.float32)
    g = tl.load(g_ptr + qk_off).to(tl.float32)
    b = tl.load(b_ptr + qk_off).to(tl.float32)
    v_off = (bi * HV + hv) * V + ov
    v = tl.load(v_ptr + v_off).to(tl.float32)
    w = tl.load(w_ptr + v_off).to(tl.float32)
    if FUSED:  # g holds f = f_proj(x), b and w hold pre-activations (GDN2_SPEC.md 1.2 steps 3-4)
        a = tl.exp(tl.load(alog_ptr + hq).to(tl.float32))
        g = -a * _softplus(g + tl.load(dtb_ptr + hq * K + ok).to(tl.float32))
        b = tl.sigmoid(b)
        if NEG_EIG:
            b = 2.0 * b
        w = tl.sigmoid(w)
    if L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    q = q * scale

    slot = tl.load(slots_ptr + bi).to(tl.int64)
    o = tl.zeros([BV], dtype=tl.float32)
    if slot >= 0:                                               # negative slot: padding, touch nothing
        head = slot * HV + hv
        tile = head * (K * V) + pv * BV
        srow = head * (K if ROW else 1)
        offs = ok[:, None] * V + tl.arange(0, BV)[None, :]
        c, sc = load_codes(codes_ptr + tile, scales_ptr + srow, offs, ok, MODE, ROW)
        s = c * (sc * tl.exp(g))[:, None]                       # dequantize and decay each key row
        r = tl.sum((b * k)[:, None] * s, axis=0)                # read along the erase direction
        s = s + k[:, None] * (w * v - r)[None, :]               # rank-1 write along k
        o = tl.sum(q[:, None] * s, axis=0)                      # read after this token's write
        store_state(s, sc, codes_ptr + tile, scales_ptr + srow, res_ptr + tile,
                    static_ptr + hv * (K if ROW else 1), offs, ok, tl.load(seed_ptr), (bi * HV + hv) * (K * V),
                    MODE, ROW, ROUND, STATIC)
    tl.store(o_ptr + v_off, o.to(o_ptr.dtype.element_ty))


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
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the decode kernel. q, k, g, b: [B, HQ, K]; v, w: [B, HV, V]; returns o [B, HV, V].

    num_warps / block_v override the launch heuristic (benchmark sweeps); quantized states need whole rows.
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
    dummy = pool.codes
    stat = effective_static_scales(fmt, static_scales, HV, K, q.device)
    seeds = seed_tensor(fmt, seed, q.device)
    grid = (B * HV, V // BV)
    _decode_kernel[grid](
        q, k, v, g, b, w, A_log if fused else q, dt_bias if fused else q, o,
        pool.codes, pool.scales if pool.scales is not None else dummy,
        pool.residual if pool.residual is not None else dummy, stat, slots, seeds,
        float(K ** -0.5 if scale is None else scale),
        HQ=HQ, HV=HV, K=K, V=V, BV=BV, FUSED=fused, NEG_EIG=allow_neg_eigval, L2NORM=use_qk_l2norm,
        num_warps=num_warps or 4, **format_constexprs(fmt),
    )
    return o
