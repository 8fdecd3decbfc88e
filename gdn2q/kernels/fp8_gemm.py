"""Skinny fp8 GEMM for decode batches: y[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * wq[n, k], M <= 256.

Why hand-written: for the 1.3B decode step at M=64 cuBLASLt picks one 128x128 row-scaled fp8 kernel
(``nvjet_sm90_qqtst_128x128_..._ovscale``) for every projection; on an H200 its 72 launches took 942 µs per step,
~30% of HBM bandwidth for ~1.2 GB of e4m3 weights, while the bf16 split-K GEMMs of the baseline stream
~2.6 TB/s. A decode GEMM is a weight stream: the tile over M covers the whole batch, N is cut finely enough to
put a program on every multiprocessor, and where N alone cannot (o_proj, down: N = 2304) K is split too.

The operands are e4m3 on the Hopper tensor cores (fp8 wgmma, fp32 accumulation). Both must be K-major, so the
weight tile is loaded as stored, [BLOCK_N, BLOCK_K] with K contiguous, and only its view is transposed.
Hopper's fp8 wgmma adds into its accumulator with fewer mantissa bits than fp32, and Triton's sm_90 default
lets that run over the whole K loop; ``max_num_imprecise_acc=BLOCK_K`` adds each K tile's sum into a true fp32
accumulator instead (as cuBLAS does without fast accumulation), a few FADDs per tile in a memory-bound kernel.
The row scales multiply the accumulator once in the epilogue; activation scales per token and block of K
(xs [M, K / XB]) multiply each K tile's sum as it is added instead. A split-K launch writes its fp32 partial sums
[S, M, N] (already scaled) and leaves the sum to the consumer (:func:`gdn2q.kernels.glue.add_rms_norm` reads
them with the residual it adds them to), which costs no reduction launch and no atomics (deterministic).

Under programmatic dependent launch (:mod:`gdn2q.kernels.pdl`) the programs are scheduled while the kernel
before them (the norm that writes the activation codes) still runs, and wait for it before their first load.
The weights depend on no earlier kernel, so before that wait each program asks L2 for the lines of its first
``prefetch_tiles`` weight tiles (``prefetch.global.L2``, one line per weight row and tile): the first DRAM
round trip of the K loop then overlaps the kernel before. On an H200 that took the 1.3B step at B=64 from 1.475
to 1.429 ms. Pulling each program's whole weight slab instead (one bulk prefetch per row) measured 1% slower,
as it competes with the previous GEMM's stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdn2q.kernels import pdl
from gdn2q.kernels.state_io import INTERPRETED


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of one product; ``k_split`` (a multiple of block_k) is the K range of each split."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    k_split: int
    num_warps: int
    num_stages: int
    prefetch_tiles: int = 0   # weight K tiles each program asks L2 for before its PDL wait


PREFETCH_TILES = 4   # H200, 1.3B step at B=64 under PDL: 1.475 ms without, 1.441 (1 tile), 1.430 (2), 1.429 (4)


# Launches measured inside the graphed 1.3B decode step at B=64 (tools/tune_gemm_in_step.py), where the kernels
# around a GEMM share the card with it, which standalone timings miss; by card name and weight shape (N, K), for
# batches of one 64-row block. Everything else takes the rule of gemm_config.
STEP_TUNED: dict[str, dict[tuple[int, int], dict[str, int]]] = {
    "NVIDIA H100 80GB HBM3": {(12416, 2304): dict(num_stages=4), (2304, 2048): dict(block_n=32, splits=2)},
}


@functools.cache
def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def step_tuned(device: torch.device, M: int, N: int, K: int, allow_split: bool) -> dict[str, int]:
    """The :data:`STEP_TUNED` launch keywords of this product on this card ({} where none was measured)."""
    tuned = dict(STEP_TUNED.get(card_name(device), {}).get((N, K), {})) if M <= 64 else {}
    if not allow_split:
        tuned.pop("splits", None)
    return tuned


@functools.cache
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 132 (an H100/H200) for the CPU interpreter, so tests see its choices."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def gemm_config(M: int, N: int, K: int, sms: int, *, allow_split: bool = True, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None, splits: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                prefetch_tiles: int | None = None) -> GemmConfig:
    """The default launch for an [M, K] x [N, K]^T product on ``sms`` multiprocessors; keywords override it.

    One M block covers a decode batch of up to 64 rows, so the weight is read once (smaller batches wrap rows
    and still get the 64-row fp8 wgmma; a 16-row tile would fall back to fp16 mma.sync on converted codes).
    BLOCK_N is 128 where that still gives every multiprocessor a program, else 64; if the programs still do not
    fill the GPU, K is split, at most until the partial sums (S * M * 4 bytes per output column, written and
    read back) reach half the weight bytes (K per column). Under PDL each program first asks L2 for its first
    PREFETCH_TILES weight tiles (at most its split's), a power of two.
    """
    if splits is not None and splits > 1 and not allow_split:
        raise ValueError("split-K needs a consumer of partial sums (partials=True)")
    bm = block_m or (64 if M <= 64 else 128)
    m_blocks = triton.cdiv(M, bm)
    bn = block_n or (128 if triton.cdiv(N, 128) * m_blocks >= sms else 64)
    bk = block_k or 128
    k_tiles = triton.cdiv(K, bk)
    if splits is None:
        tiles = triton.cdiv(N, bn) * m_blocks
        splits = 1
        if allow_split and tiles < sms:
            splits = max(1, min(triton.cdiv(sms, tiles), k_tiles, K // (8 * M)))
    k_split = triton.cdiv(k_tiles, max(1, splits)) * bk
    stage_bytes = (bm + bn) * bk
    pf = PREFETCH_TILES if prefetch_tiles is None else prefetch_tiles
    pf = min(pf, k_split // bk)
    return GemmConfig(block_m=bm, block_n=bn, block_k=bk, splits=triton.cdiv(K, k_split), k_split=k_split,
                      num_warps=num_warps or (8 if bm >= 128 else 4),
                      num_stages=num_stages or max(2, min(5, (128 << 10) // stage_bytes)),
                      prefetch_tiles=1 << (pf.bit_length() - 1) if pf > 0 else 0)


@triton.jit
def _tile_dot(a, b, acc, BLOCK_K: tl.constexpr):
    """acc + a b^T of one K tile; the GPU's fp8 wgmma sum is promoted into the fp32 accumulator (see the module
    docstring). The CPU interpreter has no fp8 dot; e4m3 values are exact in fp32."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                     PREFETCH: tl.constexpr = 0, XB: tl.constexpr = 0):
    """One [BLOCK_M, BLOCK_N] tile of split program_id(1): out[s, m, n] for x [M, K], w [N, K] (contiguous).

    XB > 0: x has one scale per row and block of XB columns (xs [M, K / XB], XB a multiple of BLOCK_K)."""
    pdl.launch_dependents(PDL)
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M or N read a valid row again (wrapped) instead of masking every load; the store drops them
    lm, ln = rm % M, rn % N
    k0 = pid_s * K_SPLIT
    if PDL and PREFETCH > 0:   # the weights depend on no earlier kernel: start their first tiles now
        lines = k0 + tl.arange(0, (PREFETCH * BLOCK_K + 127) // 128) * 128   # a 128-byte line per 128 codes
        pdl.prefetch_l2(w_ptr + ln.to(tl.int64)[:, None] * K + tl.minimum(lines, K - 1)[None, :])
    pdl.wait(PDL)   # the activations (and the buffer written below) belong to earlier kernels
    x_ptrs = x_ptr + lm.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]
    w_ptrs = w_ptr + ln.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]
    k_len = tl.minimum(K_SPLIT, K - k0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, k_len, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=rk[None, :] < k_len - k, other=0.0)
            b = tl.load(w_ptrs, mask=rk[None, :] < k_len - k, other=0.0)
        if XB > 0:   # this K tile's sum times its block's activation scales
            sx = tl.load(xs_ptr + lm * (K // XB) + (k0 + k) // XB)[:, None]
            acc += _tile_dot(a, b, None, BLOCK_K) * sx
        else:
            acc = _tile_dot(a, b, acc, BLOCK_K)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if XB == 0:
        acc = acc * tl.load(xs_ptr + lm)[:, None]
    y = acc * tl.load(ws_ptr + ln)[None, :]
    out = out_ptr + pid_s.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, partials: bool = False, **overrides) -> torch.Tensor:
    """(xq * xs) (wq * ws)^T for xq [M, K] e4m3 with xs [M, 1] (or per block of columns [M, K / XB]) fp32,
    wq [N, K] e4m3 with ws [N] fp32.

    Returns [M, N] in ``out_dtype``; with ``partials=True`` the launch may split K and then returns the fp32
    partial sums [S, M, N], which the caller must sum over S. ``overrides`` are :func:`gemm_config` keywords.
    """
    M, K = xq.shape
    N = wq.shape[0]
    cfg = gemm_config(M, N, K, sm_count(xq.device), allow_split=partials,
                      **{**step_tuned(xq.device, M, N, K, partials), **overrides})
    xq, xs, wq, ws = xq.contiguous(), xs.float().contiguous(), wq.contiguous(), ws.float().contiguous()
    xb = 0 if xs.shape[-1] == 1 else K // xs.shape[-1]
    if xb and (K % xs.shape[-1] or xb % cfg.block_k):
        raise ValueError(f"activation blocks of {K}/{xs.shape[-1]} columns need K tiles ({cfg.block_k}) inside them")
    if cfg.splits == 1:
        out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    else:
        out = torch.empty(cfg.splits, M, N, dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(N, cfg.block_n), cfg.splits, triton.cdiv(M, cfg.block_m))
    _fp8_gemm_kernel[grid](xq, xs, wq, ws, out, M, N, K, cfg.k_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0, PREFETCH=cfg.prefetch_tiles, XB=xb,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(xq.device))
    return out

