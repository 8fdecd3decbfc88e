"""Fused Triton kernels for GDN-2 inference with the recurrent state stored in fp32, bf16, int8 or fp8.

Layout (as gdn2q.ops): q, k, g, b carry HQ q/k heads (HQ divides HV; GVA heads are repeated consecutively),
v, w carry HV value heads. The recurrent states live in a *pool*, a :class:`gdn2q.quant.state.QuantizedState`
with codes [P, HV, K, V] (+ fp32 scales [P, HV, K|1], + residual codes for error feedback), created by
:func:`new_state_pool`; ``slots`` (int [B]) maps each sequence of the batch to its pool row (continuous
batching; a negative slot is padding: output 0, no state touched). Kernels update the pool in place.

Entry points (each runs the Triton kernel on CUDA tensors when :func:`available`, K and V are powers of two
in 16..256 and the format has no packed 4-bit residual, else the PyTorch reference of
:mod:`gdn2q.kernels.reference`; :func:`backend` says which one runs):

- ``decode_step(q, k, v, g, b, w, pool, slots, fmt)``: one token, q, k, g, b [B, HQ, K], v, w [B, HV, V];
  returns o [B, HV, V]; with ``out_norm`` (:class:`OutputNorm`, int8/fp8 states) its gated RMSNorm as
  o_proj's e4m3 input (codes [B, HV*V], one scale per sequence and value head). With ``A_log`` [HQ] and
  ``dt_bias`` [HQ*K] given, g, b, w are taken as pre-activations (f_proj output, b_proj, w_proj outputs)
  and the gates are computed inside the kernel (once per tile for int8/fp8 states, once per V block of a
  tile for fp32/bf16: where the gates can be computed once per channel upstream, as
  :func:`gdn2q.kernels.glue.decode_inputs` does, that is cheaper).
- ``chunk_prefill(q, k, v, g, b, w, pool, slots, fmt, initial=True)``: T tokens, [B, T, H, D] inputs
  (g, b, w already activated); starts from pool[slots] (or zeros when ``initial=False``) and leaves the
  final state stored in ``fmt``; returns o [B, T, HV, V].
- ``fp8_linear``: per-row scaled fp8 projections on Hopper: a Triton GEMM for decode batches (M <= 256,
  :mod:`gdn2q.kernels.fp8_gemm`), ``torch._scaled_mm`` above.

Stochastic rounding draws from a Philox seed; pass ``seed`` as a 1-element int64 CUDA tensor to keep it
inside a CUDA graph (it is incremented after every call).
"""

from __future__ import annotations

import os

import torch

from gdn2q.kernels.fp8_linear import Fp8Linear, fp8_linear, quantize_weight_fp8
from gdn2q.kernels.reference import OutputNorm, decode_reference, gates, output_norm_reference, prefill_reference
from gdn2q.quant.state import QuantizedState, StateQuantConfig

__all__ = ["Fp8Linear", "OutputNorm", "available", "backend", "chunk_prefill", "decode_step", "fp8_linear",
           "new_state_pool", "quantize_weight_fp8"]


def available() -> bool:
    """True when the Triton kernels can run: a CUDA device, or the Triton CPU interpreter (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def backend(x: torch.Tensor, K: int, V: int, fmt: StateQuantConfig | None = None) -> str:
    """"triton" if the kernels handle tensors like ``x`` with head dims K, V in ``fmt``, else "torch".

    The kernels need power-of-two head dims in 16..256 and a full-width error-feedback residual (the packed
    4-bit residual runs on the PyTorch path).
    """
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    on_device = x.is_cuda or (interp and x.device.type == "cpu")
    shapes_ok = all(16 <= d <= 256 and d & (d - 1) == 0 for d in (K, V))   # whole power-of-two tiles
    fmt_ok = fmt is None or fmt.rounding != "error-feedback" or fmt.residual == "full"
    return "triton" if available() and on_device and shapes_ok and fmt_ok else "torch"


def new_state_pool(P: int, HV: int, K: int, V: int, fmt: StateQuantConfig,
                   device: torch.device | str = "cpu") -> QuantizedState:
    """A zero state pool of P slots in ``fmt`` (codes, scales and residual as fmt needs them)."""
    codes = torch.zeros(P, HV, K, V, dtype=fmt.torch_dtype, device=device)
    if not fmt.quantized:
        return QuantizedState(codes)
    scales = torch.zeros(P, HV, K if fmt.granularity == "row" else 1, dtype=torch.float32, device=device)
    residual = None
    if fmt.rounding == "error-feedback" and fmt.residual == "int4":   # packed nibbles, 8 encodes 0
        residual = torch.full((P, HV, K, V // 2), 0x88, dtype=torch.uint8, device=device)
    elif fmt.rounding == "error-feedback":
        residual = torch.zeros_like(codes)
    return QuantizedState(codes, scales, residual)


def _bump(seed: int | torch.Tensor | None) -> None:
    if isinstance(seed, torch.Tensor):
        seed.add_(1)


def decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, allow_neg_eigval: bool = False, scale: float | None = None,
    use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, force: str | None = None,
    out_norm: OutputNorm | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode token for B sequences, updating pool[slots] in place; returns o [B, HV, V] (with
    ``out_norm``, an int8/fp8 state and no ``out``: the e4m3 rows and scales of its gated RMSNorm).

    ``force`` ("triton" | "torch") overrides the dispatch (tests and benchmarks).
    """
    if out_norm is not None and (not fmt.quantized or out is not None):
        raise ValueError("out_norm needs an int8/fp8 state and no out buffer")
    which = force or backend(q, k.shape[-1], v.shape[-1], fmt)
    if which == "triton":
        from gdn2q.kernels.decode import decode_triton

        o = decode_triton(q, k, v, g, b, w, pool, slots, fmt, A_log=A_log, dt_bias=dt_bias,
                          allow_neg_eigval=allow_neg_eigval, scale=scale, use_qk_l2norm=use_qk_l2norm,
                          static_scales=static_scales, seed=seed, out=out, out_norm=out_norm)
        if fmt.rounding == "stochastic":
            _bump(seed)
        return o
    if A_log is not None:
        g, b, w = gates(g, b, w, A_log, dt_bias, allow_neg_eigval)
    o = decode_reference(q, k, v, g, b, w, pool, slots, fmt, scale=scale, use_qk_l2norm=use_qk_l2norm,
                         static_scales=static_scales)
    if out_norm is not None:
        return output_norm_reference(o, out_norm)
    return o if out is None else out.copy_(o)


def chunk_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    pool: QuantizedState, slots: torch.Tensor, fmt: StateQuantConfig, *, initial: bool = True,
    scale: float | None = None, use_qk_l2norm: bool = True, static_scales: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None, out: torch.Tensor | None = None, force: str | None = None,
) -> torch.Tensor:
    """Prefill T tokens for B sequences from pool[slots] (zeros if not ``initial``); returns o [B, T, HV, V]."""
    which = force or backend(q, k.shape[-1], v.shape[-1], fmt)
    if which == "triton":
        from gdn2q.kernels.prefill import prefill_triton

        o = prefill_triton(q, k, v, g, b, w, pool, slots, fmt, initial=initial, scale=scale,
                           use_qk_l2norm=use_qk_l2norm, static_scales=static_scales, seed=seed, out=out)
        if fmt.rounding == "stochastic":
            _bump(seed)
        return o
    o = prefill_reference(q, k, v, g, b, w, pool, slots, fmt, initial=initial, scale=scale,
                          use_qk_l2norm=use_qk_l2norm, static_scales=static_scales)
    return o if out is None else out.copy_(o)
