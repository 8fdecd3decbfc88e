"""Observers: running statistics of Linear inputs, GDN-2 gates and recurrent states.

Written by hand: torchao's observers track one tensor's range for one quantizer; here every Linear's
per-input-channel range, the GDN-2 gate values and the per-(head, key row) state range are needed together,
accumulated over a whole calibration run.
"""

from __future__ import annotations

import torch

INT8_QMAX = 127.0
MSE_RATIOS = torch.linspace(0.3, 1.0, 36)   # candidate clip levels, as a fraction of the channel absmax


class ChannelRangeObserver:
    """Per-input-channel absmax of everything a Linear reads, plus a fixed, deterministic row sample.

    The sample (every ``stride``-th token, at most ``max_rows`` rows) is what percentile and MSE-optimal
    clipping are computed from; the absmax always covers every token.
    """

    def __init__(self, channels: int, max_rows: int = 4096, stride: int = 7):
        self.absmax = torch.zeros(channels)
        self.max_rows, self.stride = max_rows, stride
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.seen = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1]).abs()
        self.absmax = torch.maximum(self.absmax, x.amax(0).cpu())
        first = (-self.seen) % self.stride
        self.seen += x.shape[0]
        if self.n_rows < self.max_rows:
            take = x[first::self.stride][: self.max_rows - self.n_rows].cpu()
            self.rows.append(take)
            self.n_rows += take.shape[0]

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.absmax.numel())

    def percentile(self, q: float) -> torch.Tensor:
        """Per-channel q-th percentile (0..100) of |x| over the sampled rows."""
        s = self.sample()
        if s.shape[0] == 0:
            return self.absmax.clone()
        return torch.quantile(s.double(), q / 100.0, dim=0).float()

    def mse_clip(self, qmax: float = INT8_QMAX) -> torch.Tensor:
        """Per-channel clip level minimising the int8 round-trip squared error over the sampled rows."""
        s = self.sample()
        amax = s.amax(0) if s.shape[0] else self.absmax
        best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
        for ratio in MSE_RATIOS.tolist():
            clip = (amax * ratio).clamp_min(1e-12)
            scale = clip / qmax
            err = ((torch.clamp(torch.round(s / scale), -qmax, qmax) * scale - s) ** 2).sum(0)
            better = err < best_err
            best = torch.where(better, clip, best)
            best_err = torch.where(better, err, best_err)
        return best


class ValueRangeObserver:
    """Per-element min, max and mean of a tensor stream whose trailing dims are fixed (e.g. [H, K])."""

    def __init__(self, shape: tuple[int, ...]):
        self.min = torch.full(shape, float("inf"))
        self.max = torch.full(shape, float("-inf"))
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, *self.min.shape).cpu()
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))
        self.sum += x.double().sum(0)
        self.count += x.shape[0]

    def stats(self) -> dict[str, torch.Tensor]:
        return {"min": self.min, "max": self.max, "mean": (self.sum / max(self.count, 1)).float()}


class StateRangeObserver:
    """max over tokens, sequences and value columns of |S| per (value head, key row): [HV, K]."""

    def __init__(self, heads: int, key_dim: int):
        self.absmax = torch.zeros(heads, key_dim)

    def update(self, state: torch.Tensor) -> None:
        """``state``: [B, HV, K, V] fp32, the recurrent state after some tokens."""
        self.absmax = torch.maximum(self.absmax, state.detach().abs().amax(dim=(0, 3)).float().cpu())
