"""Sliding-window softmax attention with NeoX-style RoPE (the SWA layers of hybrid GDN-2 models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2q.config import AttentionConfig
from gdn2q.model.state import AttentionLayerState


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim; x [B, H, T, D], cos/sin computed in fp32."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    xf = x.float()
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class SlidingWindowAttention(nn.Module):
    def __init__(self, hidden_size: int, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = hidden_size // cfg.num_heads
        kv = cfg.kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: AttentionLayerState | None = None, offset: int = 0):
        B, T, _ = x.shape
        c, D = self.cfg, self.head_dim
        q = self.q_proj(x).view(B, T, c.num_heads, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.kv_heads, D).transpose(1, 2)
        pos = torch.arange(offset, offset + T, device=x.device)
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        if state is not None:
            k, v = state.update(k, v)
        S = k.shape[2]                                   # keys: the S - T cached ones, then these T
        qpos = torch.arange(S - T, S, device=x.device)[:, None]
        kpos = torch.arange(S, device=x.device)[None]
        allowed = kpos <= qpos
        if c.window_size is not None:                     # each query sees itself + window-1 previous tokens
            allowed &= kpos > qpos - c.window_size
        rep = c.num_heads // c.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
        return self.o_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, -1))
