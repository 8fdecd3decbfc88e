"""The skinny fp8 GEMM (gdn2q.kernels.fp8_gemm) against the fp32 product of the same e4m3 operands.

Without CUDA it runs under the Triton interpreter (tiles upcast to fp32 before tl.dot), which checks the
indexing, masking, K splits and scaling; on a GPU the same tests run the fp8 tensor cores, and
tools/bench_fp8_gemm.py checks the full 1.3B shapes. Every buffer the kernel allocates starts as NaN, so an
element it forgets to write fails.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from gdn2q.config import GDN2Config
from gdn2q.kernels import fp8_gemm, glue
from gdn2q.kernels.bench import KernelLM
from gdn2q.model.gdn2 import GDN2Mixer
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.quant.state import StateQuantConfig

pytestmark = [pytest.mark.skipif(not glue.use_triton(torch.empty(0, device="cuda" if torch.cuda.is_available()
                                                                  else "cpu")), reason="Triton cannot run here"),
              pytest.mark.usefixtures("poisoned_empty")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
fp8_linear = importlib.import_module("gdn2q.kernels.fp8_linear")
kernel_bench = importlib.import_module("gdn2q.kernels.bench")
_real_config = fp8_gemm.gemm_config   # the package exports a function of that name
# The interpreter multiplies in fp32; Hopper's fp8 wgmma sums each K tile with fewer mantissa bits than fp32.
TOL = 1e-5 if os.environ.get("TRITON_INTERPRET") == "1" else 2 ** -11


def _operands(M: int, N: int, K: int, seed: int):
    """e4m3 activation rows and weight rows with their scales, rows of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 1, M)[:, None]
    w = torch.randn(N, K, generator=g) * torch.logspace(-3, 0, N)[:, None]
    xq, xs = fp8_linear.quantize_rows_reference(x)
    wq, ws = fp8_linear.quantize_weight_fp8(w)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t()
    return xq.to(DEV), xs.to(DEV), wq.to(DEV), ws.to(DEV), ref.to(DEV)


@pytest.mark.parametrize(("M", "N", "K", "overrides", "splits"), [
    (5, 70, 96, {"block_k": 32}, 2),                                # M, N not multiples of the block; split by default
    (70, 40, 200, {"block_k": 64, "splits": 1}, 1),                 # two M blocks; K tail masked
    (3, 130, 160, {"block_n": 32, "block_k": 32, "splits": 3}, 3),  # the last split is shorter
    (17, 48, 80, {"block_m": 16, "block_k": 32, "splits": 2}, 2),   # a split that ends inside a K tile
])
def test_fp8_gemm_matches_fp32_product(M: int, N: int, K: int, overrides: dict, splits: int):
    xq, xs, wq, ws, ref = _operands(M, N, K, seed=M + N + K)
    y = fp8_gemm.fp8_gemm(xq, xs, wq, ws, torch.float32, partials=True, **overrides)
    if splits == 1:
        assert y.shape == (M, N) and y.dtype == torch.float32
    else:
        assert y.shape == (splits, M, N) and y.dtype == torch.float32
        y = y.sum(0)
    torch.testing.assert_close(y.double(), ref, rtol=TOL, atol=TOL / 10 * ref.abs().max().item())


@pytest.mark.parametrize(("M", "K", "block", "overrides"), [
    (5, 256, 64, {"block_k": 32, "splits": 3}),   # 2 K tiles per block, a split ends inside a block
    (64, 256, 128, {"block_k": 64, "splits": 1}),
])
def test_fp8_gemm_with_block_scaled_activations(M: int, K: int, block: int, overrides: dict):
    """Activations with one scale per row and block of columns: each K tile's sum times its block's scales."""
    N = 48
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 1, K // block).repeat_interleave(block)
    xq, xs = fp8_linear.quantize_blocks_reference(x, block)
    assert xs.shape == (M, K // block)
    _, _, wq, ws, _ = _operands(M, N, K, seed=3)
    ref = fp8_linear.dequantize_rows(xq, xs).double() @ (wq.cpu().double() * ws.cpu().double()[:, None]).t()
    y = fp8_gemm.fp8_gemm(xq.to(DEV), xs.to(DEV), wq, ws, torch.float32, partials=True, **overrides)
    y = y.sum(0) if y.dim() == 3 else y
    ref = ref.to(DEV)
    # the largest block dominates every sum, and the wgmma's reduced-precision tile sum errs relative to it
    torch.testing.assert_close(y.double(), ref, rtol=TOL, atol=TOL * ref.abs().max().item())
    with pytest.raises(ValueError, match="K tiles"):
        fp8_gemm.fp8_gemm(xq.to(DEV), xs.to(DEV), wq, ws, torch.float32, block_k=2 * block)


def test_fp8_gemm_without_partials_never_splits_and_writes_out_dtype():
    M, N, K = 4, 24, 512
    xq, xs, wq, ws, ref = _operands(M, N, K, seed=5)
    assert fp8_gemm.gemm_config(M, N, K, 132, allow_split=True).splits > 1   # would split with a consumer
    y = fp8_gemm.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, block_k=64)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    # one bf16 step: the interpreter's own fp32 -> bf16 cast truncates instead of rounding to nearest
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -7, atol=TOL / 10 * ref.abs().max().item())
    with pytest.raises(ValueError, match="partials"):
        fp8_gemm.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, splits=2)

def test_step_tuned_launch_applies_on_its_card_and_shape_only(monkeypatch):
    """A STEP_TUNED entry sets the launch of its (card, N, K) at M <= 64; its K splits only where partials are
    consumed; other shapes, cards and larger M keep gemm_config's rule."""
    M, N, K = 6, 40, 256
    xq, xs, wq, ws, ref = _operands(M, N, K, seed=9)
    card = fp8_gemm.card_name(xq.device)
    monkeypatch.setattr(fp8_gemm, "STEP_TUNED", {card: {(N, K): {"block_k": 32, "splits": 3}}})
    assert fp8_gemm.step_tuned(xq.device, M, N, K, True) == {"block_k": 32, "splits": 3}
    assert fp8_gemm.step_tuned(xq.device, M, N, K, False) == {"block_k": 32}
    assert fp8_gemm.step_tuned(xq.device, 65, N, K, True) == {}
    assert fp8_gemm.step_tuned(xq.device, M, N + 1, K, True) == {}
    y = fp8_gemm.fp8_gemm(xq, xs, wq, ws, torch.float32, partials=True)
    assert y.shape == (3, M, N)
    torch.testing.assert_close(y.sum(0).double(), ref, rtol=TOL, atol=TOL / 10 * ref.abs().max().item())
    assert fp8_gemm.fp8_gemm(xq, xs, wq, ws, torch.float32).shape == (M, N)   # no consumer: no split



@pytest.mark.parametrize("M", [1, 64, 256])
def test_gemm_config_fills_the_gpu_for_the_1b3_shapes(M: int):
    """The wide projections fill 132 multiprocessors without a split; the narrow ones split K, with the
    partial sums kept to at most half the weight bytes."""
    for N, K, allow_split in ((10496, 2304, False), (12416, 2304, False), (2304, 2048, True), (2304, 6208, True)):
        cfg = fp8_gemm.gemm_config(M, N, K, 132, allow_split=allow_split)
        programs = -(-N // cfg.block_n) * -(-M // cfg.block_m) * cfg.splits
        assert cfg.k_split % cfg.block_k == 0 and (cfg.splits - 1) * cfg.k_split < K <= cfg.splits * cfg.k_split
        assert cfg.splits * M * 4 <= K / 2 or cfg.splits == 1
        if allow_split and M <= 64:
            assert programs >= 132
        assert allow_split or cfg.splits == 1
        assert cfg.prefetch_tiles == min(fp8_gemm.PREFETCH_TILES, cfg.k_split // cfg.block_k)


def test_gemm_prefetch_tiles_stay_inside_the_split_as_a_power_of_two():
    """The lines asked for before the PDL wait cover whole tiles of the program's own K range; the kernel
    builds them with tl.arange, hence a power of two."""
    assert fp8_gemm.gemm_config(64, 2304, 2048, 132, splits=8, prefetch_tiles=4).prefetch_tiles == 2
    assert fp8_gemm.gemm_config(64, 10496, 2304, 132, prefetch_tiles=3).prefetch_tiles == 2
    assert fp8_gemm.gemm_config(64, 10496, 2304, 132, prefetch_tiles=0).prefetch_tiles == 0


def _model() -> GDN2ForCausalLM:
    torch.manual_seed(0)
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=2, num_heads=1, num_v_heads=2, head_dim=32, vocab_size=97,
                     intermediate_size=96)
    model = GDN2ForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, GDN2Mixer):
            torch.nn.init.uniform_(m.A_log, 0.0, 1.0)
            torch.nn.init.uniform_(m.dt_bias, -3.0, 0.0)
    return model


def test_kernel_lm_with_the_triton_gemm_and_split_partials(monkeypatch):
    """KernelLM fp8 with every projection on the Triton GEMM, o_proj and down as split-K partials summed by
    add_rms_norm (and by prefill's last residual add), computes the logits of the fp32 fallback product."""
    model = _model().to(DEV)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEV)
    fmt = StateQuantConfig("fp32")
    with torch.no_grad(), monkeypatch.context() as mp:
        mp.setattr(fp8_linear, "_triton_gemm_ok", lambda x: False)
        mp.setattr(fp8_linear, "_scaled_mm_ok", lambda x, N: False)
        want = KernelLM(model, batch=2, fmt=fmt, recipe="fp8")
        ref = [want.prefill(ids[:, :6]), want.decode(ids[:, 6])]
    real_config = fp8_gemm.gemm_config
    splits_seen = []

    def small_tiles(M, N, K, sms, *, allow_split=True, **kw):
        cfg = real_config(M, N, K, sms, allow_split=allow_split, block_k=32, splits=2 if allow_split else 1, **kw)
        splits_seen.append(cfg.splits)
        return cfg

    monkeypatch.setattr(fp8_linear, "_triton_gemm_ok", lambda x: x.shape[0] <= fp8_linear.GEMM_MAX_M)
    monkeypatch.setattr(fp8_gemm, "gemm_config", small_tiles)
    with torch.no_grad():
        lm = KernelLM(model, batch=2, fmt=fmt, recipe="fp8")
        got = [lm.prefill(ids[:, :6]), lm.decode(ids[:, 6])]
    assert 1 in splits_seen and 2 in splits_seen
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=10 * TOL, atol=10 * TOL)


def test_kernel_lm_with_the_output_norm_in_the_int8_decode_kernel(monkeypatch):
    """fp8 recipe with an int8 state: the decode kernel hands o_proj e4m3 rows with one scale per (token,
    head), which the Triton GEMM applies per K tile; the logits match the same recipe run on the references
    (PyTorch decode, norm, block quantization and products)."""
    import gdn2q.kernels as kernels

    model = _model().to(DEV)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2)).to(DEV)
    fmt = StateQuantConfig("int8")
    with torch.no_grad(), monkeypatch.context() as mp:
        mp.setattr(kernels, "backend", lambda *a, **k: "torch")
        mp.setattr(glue, "use_triton", lambda x: False)
        mp.setattr(fp8_linear, "_triton_gemm_ok", lambda x: False)
        mp.setattr(fp8_linear, "_scaled_mm_ok", lambda x, N: False)
        want = KernelLM(model, batch=2, fmt=fmt, recipe="fp8")
        ref = [want.prefill(ids[:, :6]), want.decode(ids[:, 6]), want.decode(ids[:, 7])]
    calls = []
    real_decode = kernels.decode_step

    def spy(*a, out_norm=None, **k):
        calls.append(out_norm is not None)
        return real_decode(*a, out_norm=out_norm, **k)

    monkeypatch.setattr(fp8_linear, "_triton_gemm_ok", lambda x: x.shape[0] <= fp8_linear.GEMM_MAX_M)
    monkeypatch.setattr(fp8_gemm, "gemm_config", lambda M, N, K, sms, **kw: _real_config(M, N, K, sms, block_k=32,
                                                                                          **kw))
    monkeypatch.setattr(kernel_bench, "decode_step", spy)
    with torch.no_grad():
        lm = KernelLM(model, batch=2, fmt=fmt, recipe="fp8")
        got = [lm.prefill(ids[:, :6]), lm.decode(ids[:, 6]), lm.decode(ids[:, 7])]
    assert calls and all(calls)
    # on the GPU an e4m3 code or an int8 state code may round the other way (ties of fp32 sums in another order)
    for g, r in zip(got, ref, strict=True):
        assert ((g - r).abs().max() / r.abs().max()).item() < 0.02
