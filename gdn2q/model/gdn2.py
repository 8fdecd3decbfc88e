"""The GDN-2 mixer (GDN2_SPEC.md 1.4), parameter names identical to fla 0.6.0 and NVIDIA lit_gpt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2q.config import GDN2Config
from gdn2q.model.norms import gated_rms_norm
from gdn2q.model.state import GDN2LayerState
from gdn2q.ops import chunk_gdn2, recurrent_gdn2

RECURRENCES = ("auto", "chunk", "serial")
SERIAL_MAX_T = 64  # like the upstream layers: token-serial form for short inputs, chunked form beyond


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over x [B, T, C] continuing from ``window`` [B, C, W] (raw inputs).

    Returns (output [B, T, C], new window: the last W raw inputs, oldest first).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)
    if window is None:
        window = xt.new_zeros(B, C, W)
    full = torch.cat([window.to(xt.dtype), xt], dim=-1)                  # [B, C, W + T]
    src, taps = full.float(), weight.float()[:, 0]
    # W shifted multiply-adds: cheaper than F.conv1d for the short kernels and single tokens of decoding
    y = sum(taps[:, j, None] * src[..., 1 + j: 1 + j + T] for j in range(W))
    if bias is not None:
        y = y + bias.float()[:, None]
    return F.silu(y).to(x.dtype).transpose(1, 2), full[..., -W:].contiguous()


class GDN2Mixer(nn.Module):
    def __init__(self, config: GDN2Config):
        super().__init__()
        c = config
        self.config = c
        d, kd, vd, r = c.hidden_size, c.key_dim, c.value_dim, c.head_v_dim
        self.q_proj = nn.Linear(d, kd, bias=False)
        self.k_proj = nn.Linear(d, kd, bias=False)
        self.v_proj = nn.Linear(d, vd, bias=False)
        if c.use_short_conv:
            self.q_conv1d = nn.Conv1d(kd, kd, c.conv_size, groups=kd, bias=c.conv_bias)
            self.k_conv1d = nn.Conv1d(kd, kd, c.conv_size, groups=kd, bias=c.conv_bias)
            self.v_conv1d = nn.Conv1d(vd, vd, c.conv_size, groups=vd, bias=c.conv_bias)
        self.f_proj = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, kd, bias=False))
        self.b_proj = nn.Linear(d, kd, bias=False)
        self.w_proj = nn.Linear(d, vd, bias=False)
        self.A_log = nn.Parameter(torch.zeros(c.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(kd))
        self.g_proj = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, vd, bias=True))
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(r))
        self.o_proj = nn.Linear(vd, d, bias=False)
        self.recurrence = "auto"

    def _short_conv(self, name: str, x: torch.Tensor, state: GDN2LayerState | None, i: int) -> torch.Tensor:
        if not self.config.use_short_conv:
            return F.silu(x)
        conv = getattr(self, f"{name}_conv1d")
        if state is not None and state.every_token:
            return state.conv_tokens(i, x, conv.weight, conv.bias)
        y, window = causal_conv(x, conv.weight, conv.bias, None if state is None else state.conv[i])
        if state is not None:
            state.conv[i] = window
        return y

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decay g (fp32 log), erase gate b and write gate w, per q/k head (before any GVA repeat)."""
        c = self.config
        f = self.f_proj(x).float() + self.dt_bias.float()
        g = -self.A_log.float().exp().unsqueeze(-1) * F.softplus(f).unflatten(-1, (c.num_heads, c.head_dim))
        b = torch.sigmoid(self.b_proj(x)).unflatten(-1, (c.num_heads, c.head_dim))
        if c.allow_neg_eigval:
            b = b * 2.0
        w = torch.sigmoid(self.w_proj(x)).unflatten(-1, (c.value_heads, c.head_v_dim))
        return g, b, w

    def forward(self, x: torch.Tensor, state: GDN2LayerState | None = None) -> torch.Tensor:
        c = self.config
        q = self._short_conv("q", self.q_proj(x), state, 0).unflatten(-1, (c.num_heads, c.head_dim))
        k = self._short_conv("k", self.k_proj(x), state, 1).unflatten(-1, (c.num_heads, c.head_dim))
        v = self._short_conv("v", self.v_proj(x), state, 2).unflatten(-1, (c.value_heads, c.head_v_dim))
        g, b, w = self.gates(x)
        G = c.value_heads // c.num_heads
        if G > 1:  # grouped value attention: value head j reads q/k head j // G
            q, k, g, b = (t.repeat_interleave(G, dim=-2) for t in (q, k, g, b))
        if state is not None and state.every_token:   # what T one-token decode calls compute
            o = state.decode_tokens(q, k, v, g, b, w)
        else:
            mode = self.recurrence
            if mode == "auto":
                mode = "serial" if x.shape[1] <= SERIAL_MAX_T else "chunk"
            op = recurrent_gdn2 if mode == "serial" else chunk_gdn2
            o, final = op(q, k, v, g, b, w, initial_state=None if state is None else state.load())
            if state is not None:
                state.store(final)
        z = self.g_proj(x).unflatten(-1, (c.value_heads, c.head_v_dim))
        o = gated_rms_norm(o, z, self.o_norm.weight, c.norm_eps, c.output_gate_activation)
        return self.o_proj(o.flatten(-2))
