"""Token-serial GDN-2 recurrence: the reference every fast path is compared against (GDN2_SPEC.md 1.3).

Written by hand because no library implements GDN-2's channel-wise erase/write update.
"""

from __future__ import annotations

import torch

L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis (eps inside the sqrt, as the upstream kernels do)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def prepare_qk(q: torch.Tensor, k: torch.Tensor, scale: float | None, use_qk_l2norm: bool):
    """fp32 q (normalised and scaled) and k (normalised), as the kernels see them."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k


def gdn2_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every (batch, head): inputs [B, HV, K|V] fp32, q/k already normalised and scaled.

    Returns (o [B, HV, V], new state [B, HV, K, V]); ``state`` itself is not modified.
    """
    s = state * g.exp().unsqueeze(-1)                            # decay each key row
    r = torch.einsum("bhk,bhkv->bhv", b * k, s)                  # read along the erase direction
    u = w * v - r                                                # gated write target minus erased read
    s = s + k.unsqueeze(-1) * u.unsqueeze(-2)                    # rank-1 write along k
    o = torch.einsum("bhk,bhkv->bhv", q, s)                      # read after this token's write
    return o, s


def recurrent_gdn2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    initial_state: torch.Tensor | None = None, scale: float | None = None, use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-serial GDN-2 over T tokens. Returns (o [B, T, HV, V] in v's dtype, final state fp32)."""
    B, T, HV, K = k.shape
    V = v.shape[-1]
    qf, kf = prepare_qk(q, k, scale, use_qk_l2norm)
    vf, gf, bf, wf = v.float(), g.float(), b.float(), w.float()
    s = q.new_zeros(B, HV, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        o, s = gdn2_step(qf[:, t], kf[:, t], vf[:, t], gf[:, t], bf[:, t], wf[:, t], s)
        out.append(o)
    o = torch.stack(out, dim=1) if out else vf.new_zeros(B, 0, HV, V)
    return o.to(v.dtype), s
