"""fp8 (e4m3) projections with per-output-row weight scales and per-token (or per-token block) activation scales.

On Hopper the product runs on the fp8 tensor cores: decode batches (M <= 256) through the skinny Triton GEMM
of :mod:`gdn2q.kernels.fp8_gemm` (cuBLASLt's row-scaled fp8 kernels stream the weights at ~30% of bandwidth
there), larger M (prefill) and Ada (8.9) through ``torch._scaled_mm`` with row-wise scales. Elsewhere the same
quantized operands are multiplied in fp32, so the CPU path computes the same function (only the accumulation
order differs). The per-token activation quantization is one Triton launch
(:func:`gdn2q.kernels.glue.quantize_rows_fp8`) where Triton runs.

Activations may instead carry one scale per token and block of columns (scales [M, K / block]): a kernel that
produces one block of a row (the decode kernel, one value head of 128 columns per program) can quantize it
without the whole row's absmax, and a finer scale is also a more accurate one. The Triton GEMM applies such
scales per K tile; elsewhere they are dequantized first.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
Fp8Rows = tuple[torch.Tensor, torch.Tensor]  # (e4m3 codes [M, N], fp32 scales [M, 1] or [M, N / block])
GEMM_MAX_M = 256   # larger products (prefill) are compute-shaped: torch._scaled_mm is the better kernel there


def quantize_rows_reference(x: torch.Tensor) -> Fp8Rows:
    """e4m3 codes of x [M, K] with one fp32 scale per row (absmax / 448)."""
    s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_blocks_reference(x: torch.Tensor, block: int) -> Fp8Rows:
    """e4m3 codes of x [M, K] with one fp32 scale per row and block of ``block`` columns: scales [M, K / block]."""
    M, K = x.shape
    codes, s = quantize_rows_reference(x.reshape(M * (K // block), block))
    return codes.view(M, K), s.view(M, K // block)


def dequantize_rows(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """fp32 values of e4m3 rows with per-row [M, 1] or per-block [M, K / block] scales."""
    return xq.float() * xs.repeat_interleave(xq.shape[-1] // xs.shape[-1], dim=-1)


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] e4m3, scales [N] fp32) for a Linear weight [N, K]."""
    codes, s = quantize_rows_reference(weight)
    return codes, s.squeeze(-1)


def _scaled_mm_ok(x: torch.Tensor, N: int) -> bool:
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and x.shape[-1] % 16 == 0 and N % 16 == 0)


def _triton_gemm_ok(x: torch.Tensor) -> bool:
    """Hopper and a decode-sized batch (the tests force it on under the Triton interpreter)."""
    from gdn2q.kernels import available

    return (x.is_cuda and x.shape[0] <= GEMM_MAX_M and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and available())


def fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
               out_dtype: torch.dtype, partials: bool = False) -> torch.Tensor:
    """(xq * xs) (w_codes * w_scales)^T for rows already quantized: xq [M, K] e4m3, xs [M, 1] (or per-block
    [M, K / block]) fp32.

    Returns [M, N] in ``out_dtype``. ``partials=True`` (for callers that can add fp32 split-K partial sums, as
    :func:`gdn2q.kernels.glue.add_rms_norm` does) lets the Triton GEMM split K and return them as [S, M, N].
    """
    N = w_codes.shape[0]
    if _triton_gemm_ok(xq):
        from gdn2q.kernels.fp8_gemm import fp8_gemm

        return fp8_gemm(xq, xs, w_codes, w_scales, out_dtype, partials=partials)
    if _scaled_mm_ok(xq, N) and xs.shape[-1] == 1:
        y = torch._scaled_mm(xq, w_codes.t(), scale_a=xs, scale_b=w_scales.view(1, N).float(),
                             out_dtype=torch.bfloat16)
    else:
        y = dequantize_rows(xq, xs) @ (w_codes.float() * w_scales.view(N, 1)).t()
    return y.to(out_dtype)


def fp8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with x quantized per token and W per output row, both e4m3."""
    from gdn2q.kernels.glue import quantize_rows_fp8  # imports Triton, which gdn2q.kernels itself does not

    K = x.shape[-1]
    N = w_codes.shape[0]
    xq, xs = quantize_rows_fp8(x.reshape(-1, K))
    y = fp8_matmul(xq, xs, w_codes, w_scales, out_dtype or x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], N)


class Fp8Linear(torch.nn.Module):
    """Drop-in replacement of an nn.Linear whose weight is stored as e4m3 codes plus row scales."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        codes, scales = quantize_weight_fp8(linear.weight.detach())
        self.register_buffer("w_codes", codes)
        self.register_buffer("w_scales", scales)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.w_codes, self.w_scales, self.bias)
