"""The explicit decode state: what a server keeps per sequence between tokens.

Per GDN-2 layer: three conv windows (the last ``conv_size`` raw q/k/v projections, oldest first) and the
recurrent state, both stored in a :class:`~gdn2q.quant.state.StateQuantConfig` format. Per attention layer:
the RoPE'd keys and values of the last ``window_size`` tokens. ``offset`` counts the tokens seen so far.

A forward over T > 1 tokens (prefill) stores the state once, at the end. With ``every_token`` set, a GDN-2 layer
instead computes exactly what T one-token decode calls would (the state and the conv windows go through their
storage format between every two tokens) while the projections still run over all T tokens at once: this is
how long streams are evaluated in minutes instead of hours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gdn2q.quant.state import QuantizedState, QuantizedWindow, StateQuantConfig, quantize_state, quantize_window


class ConvWindows:
    """The q/k/v conv windows of one layer, list-like (``windows[i]`` reads fp, assigning stores in ``dtype``)."""

    def __init__(self, dtype: str = "fp32", windows: list[torch.Tensor | None] | None = None):
        self.dtype = dtype
        self.stored: list[QuantizedWindow | None] = [None, None, None]
        for i, w in enumerate(windows or []):
            self[i] = w

    def __getitem__(self, i: int) -> torch.Tensor | None:
        w = self.stored[i]
        if w is None:
            return None
        return w.codes if w.scales is None else w.dequantize()

    def __setitem__(self, i: int, window: torch.Tensor | None) -> None:
        self.stored[i] = None if window is None else quantize_window(window, self.dtype)

    def __len__(self) -> int:
        return len(self.stored)

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.stored if w is not None)


@dataclass
class GDN2LayerState:
    conv: ConvWindows | list[torch.Tensor | None] = field(default_factory=ConvWindows)
    recurrent: QuantizedState | None = None
    fmt: StateQuantConfig = field(default_factory=StateQuantConfig)
    static_scales: torch.Tensor | None = None
    generator: torch.Generator | None = None
    every_token: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.conv, ConvWindows) or self.conv.dtype != self.fmt.conv:
            self.conv = ConvWindows(self.fmt.conv, list(self.conv))

    def load(self) -> torch.Tensor | None:
        """The recurrent state as fp32 [B, HV, K, V] (None before the first token)."""
        return None if self.recurrent is None else self.recurrent.dequantize()

    def store(self, state: torch.Tensor) -> None:
        self.recurrent = quantize_state(state, self.fmt, previous=self.recurrent,
                                        static_scales=self.static_scales, generator=self.generator)

    def decode_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                      w: torch.Tensor) -> torch.Tensor:
        """The recurrence over T tokens as T decode steps: load, one step, store (quantize), per token.

        Inputs as :func:`gdn2q.ops.recurrent_gdn2` takes them; returns o [B, T, HV, V] in v's dtype.
        """
        from gdn2q.ops.naive import gdn2_step, prepare_qk

        qf, kf = prepare_qk(q, k, None, True)
        vf, gf, bf, wf = v.float(), g.float(), b.float(), w.float()
        out = []
        for t in range(k.shape[1]):
            s = self.load()
            if s is None:
                s = kf.new_zeros(*k.shape[:1], k.shape[2], k.shape[3], v.shape[3])
            o, s = gdn2_step(qf[:, t], kf[:, t], vf[:, t], gf[:, t], bf[:, t], wf[:, t], s)
            self.store(s)
            out.append(o)
        return torch.stack(out, dim=1).to(v.dtype)

    def conv_tokens(self, i: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Causal conv + SiLU over x [B, T, C] as T decode steps: each token's own input at full precision,
        the W - 1 older ones as the stored window holds them (each column quantized once when it entered)."""
        B, T, C = x.shape
        W = weight.shape[-1]
        xt = x.transpose(1, 2).float()
        stored = quantize_window(xt, self.conv.dtype).dequantize()        # per column, so per token
        window = self.conv[i]
        window = xt.new_zeros(B, C, W) if window is None else window.float()
        full = torch.cat([window, stored], dim=-1)
        y = F.conv1d(full[..., 1:], weight.float(), None if bias is None else bias.float(), groups=C)
        y = y + weight[:, 0, -1:].float() * (xt - stored)                 # the newest tap reads the fp input
        self.conv[i] = full[..., -W:].to(x.dtype).contiguous()
        return F.silu(y).to(x.dtype).transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + (self.recurrent.nbytes if self.recurrent is not None else 0)


@dataclass
class AttentionLayerState:
    key: torch.Tensor | None = None     # [B, kv_heads, n, head_dim], after RoPE
    value: torch.Tensor | None = None
    window: int | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's k/v; return everything the new queries may attend to (old window + new)."""
        if self.key is not None:
            k, v = torch.cat([self.key, k], dim=2), torch.cat([self.value, v], dim=2)
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window)
        self.key, self.value = k[:, :, -keep:], v[:, :, -keep:]
        return k, v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)


@dataclass
class DecodeState:
    layers: list[GDN2LayerState | AttentionLayerState]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
