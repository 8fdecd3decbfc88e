"""PyTorch versions of the kernel entry points: the CPU fallback and the oracle the kernels are tested against.

They compose gdn2q.ops (the recurrence) and gdn2q.quant.state (the storage formats) around the slot-indexed
state pool the kernels update in place; nothing here re-implements either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn2q.kernels.fp8_linear import Fp8Rows, quantize_blocks_reference
from gdn2q.model.norms import rms_normalize
from gdn2q.ops.chunk import chunk_gdn2
from gdn2q.ops.naive import gdn2_step, prepare_qk
from gdn2q.quant.state import QuantizedState, StateQuantConfig, quantize_state


def gates(f: torch.Tensor, b_pre: torch.Tensor, w_pre: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
          allow_neg_eigval: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, b, w) from pre-activations, fp32 (GDN2_SPEC.md 1.2 steps 3-4). f, b_pre: [..., HQ, K]."""
    HQ, K = f.shape[-2:]
    g = -A_log.float().exp().unsqueeze(-1) * F.softplus(f.float() + dt_bias.float().reshape(HQ, K))
    b = torch.sigmoid(b_pre.float()) * (2.0 if allow_neg_eigval else 1.0)
    return g, b, torch.sigmoid(w_pre.float())


@dataclass(frozen=True)
class OutputNorm:
    """The gated RMSNorm after the recurrence (per value head, gated by act(z + z_bias)), given to
    :func:`gdn2q.kernels.decode_step` to have it run inside the int8/fp8-state decode kernel, whose output is
    then o_proj's input: e4m3 codes with one scale per (token, value head), which each program has whole."""

    z: torch.Tensor                 # gate pre-activations [B, HV * V]
    z_bias: torch.Tensor | None     # [HV * V]
    weight: torch.Tensor            # [V]
    eps: float
    activation: str                 # "sigmoid" (fla-trained) or "swish" (NVIDIA-trained)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, z_bias: torch.Tensor | None, weight: torch.Tensor,
                   eps: float, activation: str) -> torch.Tensor:
    """fp32 rows [M, HV * V]: the per-head RMSNorm of o [M, HV, V] gated by act(z + z_bias), z [M, HV * V]."""
    n = rms_normalize(o, weight, eps)
    zf = (z.float() if z_bias is None else z.float() + z_bias.float()).reshape(n.shape)
    gate = torch.sigmoid(zf) if activation == "sigmoid" else F.silu(zf)
    return (n * gate).flatten(-2)


def output_norm_reference(o: torch.Tensor, norm: OutputNorm) -> Fp8Rows:
    """:class:`OutputNorm` of o [B, HV, V] as e4m3 codes [B, HV * V] with scales [B, HV]."""
    y = gated_rms_norm(o, norm.z, norm.z_bias, norm.weight, norm.eps, norm.activation)
    return quantize_blocks_reference(y, o.shape[-1])


def repeat_heads(x: torch.Tensor, HV: int) -> torch.Tensor:
    """Broadcast q/k-side heads (axis -2) to HV value heads, consecutively (GVA)."""
    return x.repeat_interleave(HV // x.shape[-2], dim=-2)


def _select(pool: QuantizedState, slots: torch.Tensor) -> QuantizedState:
    return pool.index_select(slots.clamp_min(0).long())


def _write(pool: QuantizedState, slots: torch.Tensor, new: QuantizedState) -> None:
    keep = slots >= 0
    idx = slots[keep].long()
    for dst, src in ((pool.codes, new.codes), (pool.scales, new.scales), (pool.residual, new.residual)):
        if dst is not None:
            dst[idx] = src[keep].to(dst.dtype)


def decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, scale: float | None = None,
    use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per sequence; q, k, g, b: [B, HQ, K]; v, w: [B, HV, V]. Updates pool[slots] in place."""
    HV = v.shape[1]
    q, k, g, b = (repeat_heads(t, HV) for t in (q, k, g, b))
    qf, kf = prepare_qk(q, k, scale, use_qk_l2norm)
    prev = _select(pool, slots)
    o, s = gdn2_step(qf, kf, v.float(), g.float(), b.float(), w.float(), prev.dequantize())
    new = quantize_state(s, fmt, previous=prev, static_scales=static_scales, generator=generator)
    _write(pool, slots, new)
    return torch.where((slots >= 0).view(-1, 1, 1), o, 0.0).to(v.dtype)


def prefill_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, initial: bool = True,
    scale: float | None = None, use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """T tokens per sequence (chunked form); q, k, g, b: [B, T, HQ, K]. Leaves pool[slots] = stored S_T."""
    HV = v.shape[2]
    q, k, g, b = (repeat_heads(t, HV) for t in (q, k, g, b))
    prev = _select(pool, slots) if initial else None
    s0 = prev.dequantize() if prev is not None else None
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=s0, scale=scale, use_qk_l2norm=use_qk_l2norm)
    new = quantize_state(s, fmt, previous=prev, static_scales=static_scales, generator=generator)
    _write(pool, slots, new)
    return o
