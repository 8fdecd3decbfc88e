"""Long-stream evaluation of recurrent-state formats: one long text through the decode path.

A server keeps each sequence's state between tokens in its storage format; errors made at one store are
carried (and possibly amplified or erased by the gates) into every later token. This module streams a text
of any length through the model with the state stored in each format *between every two tokens*, and
measures KL(reference || run), top-1 agreement and perplexity by position against the reference: the same
weights with an fp32 state (or any other reference model).

Several formats share one forward: each is a row of the batch whose GDN-2 layers store their rows in their
own format (:class:`StackedLayerState`). Runs with other weights (e.g. int8 weight-only) are batched per model.
Segments of ``segment`` tokens go through :meth:`GDN2LayerState.decode_tokens` (exactly what one-token decode
calls compute, with the projections batched over the segment), so 64k-token streams take minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdn2q.eval.metrics import AgreementMeter, token_stats
from gdn2q.model.state import DecodeState, GDN2LayerState
from gdn2q.quant.state import StateQuantConfig

STATE_DTYPE_NAMES = ("fp32", "bf16", "int8", "fp8")
ROUNDING_NAMES = ("nearest", "stochastic", "error-feedback")


@dataclass
class StreamRun:
    """One configuration to stream: a state format, and the model (None = the reference model's weights)."""

    name: str
    fmt: StateQuantConfig
    model: nn.Module | None = None


def grid_runs(granularity: str = "row", scales: str = "dynamic", conv: str = "fp32") -> list[StreamRun]:
    """Every state dtype x rounding mode (bf16/fp32 have no rounding choice: one run each)."""
    runs = []
    for dtype in STATE_DTYPE_NAMES:
        for rounding in ROUNDING_NAMES if dtype in ("int8", "fp8") else ("nearest",):
            fmt = StateQuantConfig(dtype, granularity, rounding, scales if dtype in ("int8", "fp8") else "dynamic",
                                   conv)
            runs.append(StreamRun(fmt.label, fmt))
    return runs


class StackedLayerState(GDN2LayerState):
    """One GDN-2 layer's state for a batch whose row groups are stored in different formats (one part each)."""

    def __init__(self, parts: list[GDN2LayerState], rows: list[int]):
        super().__init__(every_token=True)
        self.parts, self.rows = parts, rows

    def load(self) -> torch.Tensor | None:
        states = [p.load() for p in self.parts]
        return None if states[0] is None else torch.cat(states, dim=0)

    def store(self, state: torch.Tensor) -> None:
        for part, rows in zip(self.parts, state.split(self.rows, dim=0), strict=True):
            part.store(rows)

    def conv_tokens(self, i: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([p.conv_tokens(i, rows, weight, bias)
                          for p, rows in zip(self.parts, x.split(self.rows, dim=0), strict=True)], dim=0)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def stacked_state(model: nn.Module, fmts: list[StateQuantConfig], seed: int = 0, rows: int = 1) -> DecodeState:
    """A decode state of len(fmts) * rows rows, group i stored in fmts[i], every GDN-2 layer in per-token mode."""
    groups = [model.new_state(rows, fmt, generator=torch.Generator(model.device).manual_seed(seed + i))
              for i, fmt in enumerate(fmts)]
    layers = []
    for j, layer in enumerate(groups[0].layers):
        if isinstance(layer, GDN2LayerState):
            parts = [g.layers[j] for g in groups]
            for p in parts:
                p.every_token = True
            layers.append(StackedLayerState(parts, [rows] * len(parts)))
        else:
            layers.append(model.new_state(len(fmts) * rows).layers[j])   # attention window: format-independent
    return DecodeState(layers)


def state_bytes(config, fmt: StateQuantConfig) -> dict[str, int]:
    """Bytes one sequence's decode state takes per GDN-2 layer in ``fmt``: recurrent, conv, both."""
    recurrent = config.value_heads * fmt.bytes_per_head(config.head_dim, config.head_v_dim)
    conv = fmt.conv_bytes(2 * config.key_dim + config.value_dim, config.conv_size) if config.use_short_conv else 0
    return {"recurrent": recurrent, "conv": conv, "total": recurrent + conv}


@torch.no_grad()
def stream_compare(reference: nn.Module, runs: list[StreamRun], ids: torch.Tensor, segment: int = 256,
                   bucket: int = 4096, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Stream ``ids`` [N] through every run; results per run name, with the keys of
    :func:`gdn2q.eval.compare.compare_models` (``by_position`` over absolute stream positions).

    The reference is ``reference`` with an fp32 state, run in full forwards of ``segment`` tokens carrying the
    state (equal to token-by-token decoding to fp32 rounding).
    """
    groups: dict[int, tuple[nn.Module, list[int]]] = {}
    for i, run in enumerate(runs):
        m = run.model if run.model is not None else reference
        groups.setdefault(id(m), (m, []))[1].append(i)
    states = {key: stacked_state(m, [runs[i].fmt for i in idx], seed) for key, (m, idx) in groups.items()}
    ref_state = reference.new_state(1, StateQuantConfig())
    stats: list[list[dict[str, torch.Tensor]]] = [[] for _ in runs]
    n = ids.numel()
    for start in range(0, n - 1, segment):
        seg = ids[start:min(start + segment, n)].to(reference.device)
        targets = ids[start + 1:start + 1 + seg.numel()].view(1, -1)
        ref_logits = reference(seg.view(1, -1), ref_state)[:, :targets.shape[1]].float().cpu()
        for key, (m, idx) in groups.items():
            logits = m(seg.view(1, -1).expand(len(idx), -1), states[key])[:, :targets.shape[1]].float().cpu()
            for row, i in enumerate(idx):
                stats[i].append(token_stats(ref_logits, logits[row:row + 1], targets))
        if progress:
            progress(min(start + segment, n - 1), n - 1)
    results = {}
    for run, run_stats in zip(runs, stats, strict=True):
        meter = AgreementMeter(bucket)
        meter.add({k: torch.cat([s[k] for s in run_stats], dim=1) for k in run_stats[0]})
        config = (run.model or reference).config
        results[run.name] = {**meter.result(), "state": run.fmt.to_dict(),
                             "state_bytes_per_layer": state_bytes(config, run.fmt), "stream_tokens": n}
    return results
