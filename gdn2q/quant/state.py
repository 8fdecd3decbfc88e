"""Storage formats for the GDN-2 recurrent state between tokens (the reference the kernels must match).

The state S [B, HV, K, V] is computed in fp32 and *stored* in one of the formats below, as a server keeps it
between decode steps. No quantization library handles a state that is re-quantized after every token, with
per-key-row scales and error feedback, so this is written by hand.

- values: fp32 | bf16 | int8 | fp8 (e4m3fn); int8/fp8 carry fp32 scales, one per (head, key row)
  (``granularity="row"``, the default) or one per head (``"head"``); value = code * scale.
- scales: ``dynamic`` (absmax of each row at every store) or ``static`` (calibrated, values clamped).
- rounding: ``nearest``; ``stochastic`` (unbiased, memoryless); ``error-feedback``: the rounding residual is
  kept beside the codes and added back before the next store, so updates smaller than half a step are not
  lost. The residual lives in the value dtype in units of ``scale * RESIDUAL_UNIT`` (int8: 1/254 of a step,
  so a half-step residual uses the full int8 range; fp8: one step), so error feedback doubles the bytes.
  ``residual="int4"`` (int8 state only) keeps it in 4 bits instead, two per byte, in units of 1/14 of a step
  (a half-step residual uses -7..7): error feedback then costs half the codes' bytes, not all of them.
- conv windows (``conv``): the last ``conv_size`` raw q/k/v projections, stored fp32 | bf16 | int8 | fp8 with one
  fp32 scale per window column (token), so each column is quantized once, when it enters the window, and the
  error never compounds (re-quantizing a column with its own absmax scale returns the same codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STATE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
}
QMAX = {"int8": 127.0, "fp8": 448.0}
RESIDUAL_UNIT = {"int8": 1.0 / 254.0, "fp8": 1.0}
RESIDUALS = ("full", "int4")
INT4_RESIDUAL_UNIT = 1.0 / 14.0
ROUNDINGS = ("nearest", "stochastic", "error-feedback")
GRANULARITIES = ("row", "head")
SCALE_MODES = ("dynamic", "static")
TINY = 1e-30


@dataclass(frozen=True)
class StateQuantConfig:
    """How the recurrent state is stored between tokens (data, not code paths)."""

    dtype: str = "fp32"
    granularity: str = "row"
    rounding: str = "nearest"
    scales: str = "dynamic"
    conv: str = "fp32"
    residual: str = "full"

    def __post_init__(self) -> None:
        from gdn2q.errors import ConfigError

        for value, allowed, name in ((self.dtype, tuple(STATE_DTYPES), "state dtype"),
                                     (self.granularity, GRANULARITIES, "state granularity"),
                                     (self.rounding, ROUNDINGS, "state rounding"),
                                     (self.scales, SCALE_MODES, "state scales"),
                                     (self.conv, tuple(STATE_DTYPES), "conv state dtype"),
                                     (self.residual, RESIDUALS, "error-feedback residual")):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.residual == "int4" and self.dtype != "int8":
            raise ConfigError(f"a 4-bit error-feedback residual needs an int8 state, not {self.dtype}; "
                              "use --state int8 or the full residual")

    @property
    def quantized(self) -> bool:
        return self.dtype in QMAX

    @property
    def torch_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.dtype]

    def bytes_per_head(self, K: int, V: int) -> int:
        """Bytes one (sequence, value head) state takes in this format (codes, scales, residual)."""
        elem = torch.empty(0, dtype=self.torch_dtype).element_size()
        n = K * V * elem
        if self.quantized:
            n += 4 * (K if self.granularity == "row" else 1)
            if self.rounding == "error-feedback":
                n += K * V // 2 if self.residual == "int4" else K * V * elem
        return n

    def conv_bytes(self, channels: int, width: int) -> int:
        """Bytes of one sequence's conv windows over ``channels`` (q + k + v) in this format."""
        elem = torch.empty(0, dtype=STATE_DTYPES[self.conv]).element_size()
        return channels * width * elem + (4 * width * 3 if self.conv in QMAX else 0)

    @property
    def label(self) -> str:
        """Short name for tables: dtype, then what differs from the defaults."""
        parts = [self.dtype]
        if self.quantized:
            parts.append(self.rounding)
            parts += [x for x, default in ((self.granularity, "row"), (self.scales, "dynamic")) if x != default]
            if self.rounding == "error-feedback" and self.residual != "full":
                parts.append(f"residual-{self.residual}")
        if self.conv != "fp32":
            parts.append(f"conv-{self.conv}")
        return "/".join(parts)

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "granularity": self.granularity, "rounding": self.rounding,
                "scales": self.scales, "conv": self.conv, "residual": self.residual}


@dataclass
class QuantizedState:
    """A stored state: codes [B, HV, K, V], scales [B, HV, K|1] fp32 (or None), residual codes (or None)."""

    codes: torch.Tensor
    scales: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        if self.scales is None:
            return self.codes.float()
        return self.codes.float() * self.scales.unsqueeze(-1)

    def residual_value(self, fmt: StateQuantConfig) -> torch.Tensor | None:
        if self.residual is None:
            return None
        if fmt.residual == "int4":
            return unpack_int4(self.residual).float() * (self.scales.unsqueeze(-1) * INT4_RESIDUAL_UNIT)
        return self.residual.float() * (self.scales.unsqueeze(-1) * RESIDUAL_UNIT[fmt.dtype])

    def index_select(self, idx: torch.Tensor) -> QuantizedState:
        def sel(t):
            return None if t is None else t.index_select(0, idx)
        return QuantizedState(sel(self.codes), sel(self.scales), sel(self.residual))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.residual) if t is not None)


def pack_int4(r: torch.Tensor) -> torch.Tensor:
    """Values in -7..7 along an even last axis -> uint8, two per byte (low nibble first). torch has no int4
    storage dtype on CPU, so the nibbles are packed by hand."""
    u = (r.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4` (int8 values in -7..7)."""
    lo, hi = (p & 15).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _fp8_ulp(y: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |y| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


def _round(y: torch.Tensor, fmt: StateQuantConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Round y (already in code units) to the format's grid; returns codes in the storage dtype."""
    qmax = QMAX[fmt.dtype]
    if fmt.rounding == "stochastic":
        u = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        if fmt.dtype == "int8":
            y = torch.floor(y + u)
        else:  # one ulp of dither, then round to nearest: unbiased within a binade
            y = y + (u - 0.5) * _fp8_ulp(y)
    else:
        y = torch.round(y) if fmt.dtype == "int8" else y
    return y.clamp(-qmax, qmax).to(fmt.torch_dtype)


def quantize_state(
    state: torch.Tensor,
    fmt: StateQuantConfig,
    previous: QuantizedState | None = None,
    static_scales: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> QuantizedState:
    """Store an fp32 state [B, HV, K, V] in ``fmt``.

    ``previous`` is the state this one was computed from; error feedback adds its residual back first.
    ``static_scales`` ([HV, K] or [HV, 1], from calibration) replaces the per-store absmax when
    ``fmt.scales == "static"``.
    """
    if not fmt.quantized:
        return QuantizedState(state.to(fmt.torch_dtype))
    x = state.float()
    if fmt.rounding == "error-feedback" and previous is not None and previous.residual is not None:
        x = x + previous.residual_value(fmt)
    qmax = QMAX[fmt.dtype]
    if fmt.scales == "static":
        if static_scales is None:
            from gdn2q.errors import ConfigError

            raise ConfigError("static state scales need a calibration file (gdn2q calibrate) with state statistics")
        shape = (1, x.shape[1], x.shape[2] if fmt.granularity == "row" else 1)
        scales = static_scales.float().to(x.device).reshape(-1, static_scales.shape[-1])
        scales = scales.amax(-1, keepdim=True) if fmt.granularity == "head" else scales
        scales = scales.reshape(shape).expand(x.shape[0], -1, -1).contiguous()
    else:
        amax = x.abs().amax(dim=-1) if fmt.granularity == "row" else x.abs().amax(dim=(-2, -1)).unsqueeze(-1)
        scales = amax.clamp_min(TINY) / qmax
    y = x / scales.unsqueeze(-1)
    codes = _round(y, fmt, generator)
    residual = None
    if fmt.rounding == "error-feedback":
        if fmt.residual == "int4":
            residual = pack_int4(torch.round((y - codes.float()) / INT4_RESIDUAL_UNIT).clamp(-7, 7))
        else:
            err = (y - codes.float()) / RESIDUAL_UNIT[fmt.dtype]          # in residual units
            residual = _round(err, StateQuantConfig(fmt.dtype), None)
    return QuantizedState(codes, scales, residual)


def dequantize_state(qs: QuantizedState) -> torch.Tensor:
    return qs.dequantize()


@dataclass
class QuantizedWindow:
    """A stored conv window: codes [B, C, W] and, for int8/fp8, fp32 scales [B, 1, W] (one per column)."""

    codes: torch.Tensor
    scales: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() if self.scales is None else self.codes.float() * self.scales

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales) if t is not None)


def quantize_window(window: torch.Tensor, dtype: str) -> QuantizedWindow:
    """Store a conv window [B, C, W] in ``dtype`` (fp32 keeps the tensor as it is, in its own dtype)."""
    if dtype == "fp32":
        return QuantizedWindow(window)
    if dtype not in QMAX:
        return QuantizedWindow(window.to(STATE_DTYPES[dtype]))
    x = window.float()
    scales = x.abs().amax(dim=1, keepdim=True).clamp_min(TINY) / QMAX[dtype]
    codes = _round(x / scales, StateQuantConfig(dtype), None)
    return QuantizedWindow(codes, scales)
