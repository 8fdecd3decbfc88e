"""The recurrent-state options shared by quantize, compare and sensitivity (one definition, one help text)."""

from __future__ import annotations

from typing import Annotated

import typer

from gdn2q.quant.state import StateQuantConfig

StateOpt = Annotated[str, typer.Option(
    "--state", help="Recurrent-state storage between tokens: fp32, bf16, int8 or fp8 (e4m3, fp32 scales).")]
StateRoundingOpt = Annotated[str, typer.Option(
    "--state-rounding", help="int8/fp8 state rounding: nearest, stochastic or error-feedback (the rounding "
                             "residual is carried into the next token; --state-residual sets its bytes).")]
StateGranularityOpt = Annotated[str, typer.Option(
    "--state-granularity", help="int8/fp8 state scales: row (one per head and key row) or head.")]
StateScalesOpt = Annotated[str, typer.Option(
    "--state-scales", help="dynamic (absmax at every store) or static (calibrated; needs --calib).")]
StateResidualOpt = Annotated[str, typer.Option(
    "--state-residual", help="Error-feedback residual storage: full (int8/fp8, doubles the bytes) or int4 (int8 "
                             "state only, half a byte per element).")]
ConvStateOpt = Annotated[str, typer.Option(
    "--conv-state", help="Short-conv windows storage: fp32, bf16, int8 or fp8 (one scale per token column).")]


def state_format(state: str = "fp32", rounding: str = "nearest", granularity: str = "row",
                 scales: str = "dynamic", conv: str = "fp32", residual: str = "full") -> StateQuantConfig:
    """The options as a validated StateQuantConfig (ConfigError names the bad value and the choices)."""
    return StateQuantConfig(state, granularity, rounding, scales, conv, residual)


CompareStateOpt = Annotated[str | None, typer.Option(
    "--state", help="Store the candidate's recurrent state as fp32, bf16, int8 or fp8 between tokens (default: the "
                    "candidate's own format; with --task recall: every dtype x rounding mode).", show_default=False)]


def compare_state_format(state: str | None, rounding: str, granularity: str, scales: str, conv: str,
                         residual: str = "full") -> StateQuantConfig | None:
    """None when no --state was given (keep the model's own format)."""
    return None if state is None else state_format(state, rounding, granularity, scales, conv, residual)
