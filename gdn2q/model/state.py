"""The explicit decode state: what a server keeps per sequence between tokens.

Per GDN-2 layer: three conv windows (the last ``conv_size`` raw q/k/v projections, oldest first) and the
recurrent state, stored in a :class:`~gdn2q.quant.state.StateQuantConfig` format. Per attention layer: the
RoPE'd keys and values of the last ``window_size`` tokens. ``offset`` counts the tokens seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gdn2q.quant.state import QuantizedState, StateQuantConfig, quantize_state


@dataclass
class GDN2LayerState:
    conv: list[torch.Tensor | None] = field(default_factory=lambda: [None, None, None])
    recurrent: QuantizedState | None = None
    fmt: StateQuantConfig = field(default_factory=StateQuantConfig)
    static_scales: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def load(self) -> torch.Tensor | None:
        """The recurrent state as fp32 [B, HV, K, V] (None before the first token)."""
        return None if self.recurrent is None else self.recurrent.dequantize()

    def store(self, state: torch.Tensor) -> None:
        self.recurrent = quantize_state(state, self.fmt, previous=self.recurrent,
                                        static_scales=self.static_scales, generator=self.generator)

    @property
    def nbytes(self) -> int:
        conv = sum(c.numel() * c.element_size() for c in self.conv if c is not None)
        return conv + (self.recurrent.nbytes if self.recurrent is not None else 0)


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
