"""End-to-end decode and prefill throughput of a GDN-2 LM on the kernel path (what ``gdn2q bench`` runs).

:class:`KernelLM` runs the model's weights as a serving engine would: the projections that read the same
input are concatenated into one weight per layer (q|k|v|b|w plus the first low-rank layers of f_proj and
g_proj; MLP gate|up), so each is one GEMM, or one fp8 GEMM (:func:`gdn2q.kernels.fp8_linear.fp8_matmul`) whose
activation codes come straight out of the preceding norm kernel. o_proj and down feed only the next residual
add, so in fp8 they may return split-K partial sums, which that add_rms_norm launch sums. The recurrence
runs through :func:`gdn2q.kernels.decode_step` (gates fused in the kernel, state pool updated in place) and
:func:`gdn2q.kernels.chunk_prefill`; the glue around it is the one-launch kernels of :mod:`gdn2q.kernels.glue`.
Both recipes share all of it, so bf16 weights + fp32 state is a fair baseline. On CUDA the whole decode step
of all layers is captured in one CUDA graph, as a serving loop would replay it; on Hopper the Triton kernels of
the step are chained by programmatic dependent launch (:mod:`gdn2q.kernels.pdl`). Models with attention layers
are not supported on this path.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gdn2q.config import GDN2Config
from gdn2q.kernels import OutputNorm, backend, chunk_prefill, decode_step, new_state_pool, pdl
from gdn2q.kernels.decode import decode_kernel
from gdn2q.kernels.fp8_linear import Fp8Rows, fp8_matmul, quantize_weight_fp8
from gdn2q.kernels.glue import add_rms_norm, decode_inputs_low_rank, gated_rms_norm_rows, low_rank_up, swiglu
from gdn2q.kernels.reference import gates
from gdn2q.model.gdn2 import GDN2Mixer, causal_conv
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.quant.state import StateQuantConfig

# the 1.3B GDN-2 shape (GDN2_SPEC.md 4.1, gdn2_1.3B: 18 layers, d 2304, MLP 6208, vocab 32000)
CONFIG_1B3 = GDN2Config(hidden_size=2304, num_hidden_layers=18, num_heads=16, head_dim=128,
                        intermediate_size=6208, vocab_size=32000)


class FusedLinear:
    """Bias-free projections of one input as one weight [sum N, K]: a GEMM, or an fp8 product of e4m3 rows.

    fp8 weights keep one scale per output row, so quantizing the concatenation is quantizing each part.
    """

    def __init__(self, linears: list[nn.Linear], fp8: bool):
        w = torch.cat([lin.weight.detach() for lin in linears])
        self.fp8, self.dtype = fp8, w.dtype
        self.weight, self.scales = quantize_weight_fp8(w) if fp8 else (w, None)

    def __call__(self, x: torch.Tensor | Fp8Rows, partials: bool = False) -> torch.Tensor:
        """[M, N]; with ``partials`` an fp8 product may be fp32 split-K partials [S, M, N] (add_rms_norm sums them)."""
        if self.fp8:
            return fp8_matmul(*x, self.weight, self.scales, self.dtype, partials=partials)
        return F.linear(x, self.weight)


@dataclass
class _Layer:
    """One block's weights as the fused path reads them."""

    attn_norm: torch.Tensor
    in_proj: FusedLinear           # -> q | k | v | b | w | f_proj[0] | g_proj[0]
    low_rank: torch.Tensor         # [f_proj[1]; g_proj[1]] weights: [fr | gr] -> f | z (bias in the norm)
    z_bias: torch.Tensor | None
    taps: torch.Tensor             # q|k|v depthwise conv taps [2kd + vd, W]
    conv_bias: torch.Tensor | None
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    o_norm: torch.Tensor
    o_proj: FusedLinear
    mlp_norm: torch.Tensor
    gate_up: FusedLinear
    down: FusedLinear


def _fuse(block: nn.Module, c: GDN2Config, fp8: bool) -> _Layer:
    m: GDN2Mixer = block.attn
    if c.use_short_conv:
        taps = torch.cat([conv.weight[:, 0] for conv in (m.q_conv1d, m.k_conv1d, m.v_conv1d)])
        conv_bias = torch.cat([m.q_conv1d.bias, m.k_conv1d.bias, m.v_conv1d.bias]) if c.conv_bias else None
    else:  # no short conv: a conv whose only tap is the newest input is the bare SiLU
        taps = torch.zeros(2 * c.key_dim + c.value_dim, c.conv_size, dtype=m.q_proj.weight.dtype,
                           device=m.q_proj.weight.device)
        taps[:, -1] = 1.0
        conv_bias = None
    f1, g1 = m.f_proj[1], m.g_proj[1]
    return _Layer(
        attn_norm=block.attn_norm.weight.detach(),
        in_proj=FusedLinear([m.q_proj, m.k_proj, m.v_proj, m.b_proj, m.w_proj, m.f_proj[0], m.g_proj[0]], fp8),
        low_rank=torch.cat([f1.weight.detach(), g1.weight.detach()]),
        z_bias=None if g1.bias is None else g1.bias.detach(),
        taps=taps.detach().contiguous(), conv_bias=None if conv_bias is None else conv_bias.detach(),
        A_log=m.A_log.detach(), dt_bias=m.dt_bias.detach(), o_norm=m.o_norm.weight.detach(),
        o_proj=FusedLinear([m.o_proj], fp8), mlp_norm=block.mlp_norm.weight.detach(),
        gate_up=FusedLinear([block.mlp.gate_proj, block.mlp.up_proj], fp8),
        down=FusedLinear([block.mlp.down_proj], fp8))


class KernelLM:
    """Runs a pure GDN-2 :class:`GDN2ForCausalLM` on the kernel path with a state pool of ``batch`` slots.

    recipe "fp8": every projection that reads the hidden state or feeds the residual (the fused in-projection
    including the low-rank f/g first layers, o_proj, gate|up, down) as e4m3 with row scales and per-token
    activation scales; the low-rank second layers and lm_head stay in the model dtype. With an int8/fp8 state
    the decode kernel also runs the gated output norm and hands o_proj e4m3 rows with one scale per token and
    value head (:class:`gdn2q.kernels.OutputNorm`): one launch less per layer.
    """

    def __init__(self, model: GDN2ForCausalLM, batch: int, fmt: StateQuantConfig, recipe: str = "bf16"):
        c = model.config
        if c.attn is not None:
            raise NotImplementedError("the kernel decode path covers pure GDN-2 models (no attention layers)")
        if recipe not in ("bf16", "fp8"):
            raise ValueError("recipe must be 'bf16' or 'fp8'")
        self.model, self.c, self.fmt, self.batch, self.fp8 = model, c, fmt, batch, recipe == "fp8"
        dev = model.device
        self.layers = [_fuse(block, c, self.fp8) for block in model.model.layers]
        self.pools = [new_state_pool(batch, c.value_heads, c.head_dim, c.head_v_dim, fmt, dev)
                      for _ in range(c.num_hidden_layers)]
        self.slots = torch.arange(batch, device=dev, dtype=torch.int32)
        self.windows = [torch.zeros(batch, 2 * c.key_dim + c.value_dim, c.conv_size, dtype=model.dtype, device=dev)
                        for _ in range(c.num_hidden_layers)]

    def _block(self, i: int, x: torch.Tensor, delta: torch.Tensor | None, mixer) -> torch.Tensor:
        """Block i on residual rows x [M, d] (``x += delta`` first, in place); returns its MLP output (maybe as
        split-K partials [S, M, d]), which the next norm adds. ``mixer(i, L, y1)`` runs the low-rank layers,
        the recurrence and the gated output norm on the fused projections -> o_proj's input rows."""
        c, fp8, L = self.c, self.fp8, self.layers[i]
        y1 = L.in_proj(add_rms_norm(x, delta, L.attn_norm, c.norm_eps, fp8))
        delta = L.o_proj(mixer(i, L, y1), partials=True)
        return L.down(swiglu(L.gate_up(add_rms_norm(x, delta, L.mlp_norm, c.norm_eps, fp8)), fp8), partials=True)

    def _out_norm(self, L: _Layer, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor | Fp8Rows:
        c = self.c
        return gated_rms_norm_rows(o, z, L.z_bias, L.o_norm, c.norm_eps, c.output_gate_activation, self.fp8)

    def _logits(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        return self.model.lm_head(add_rms_norm(x, delta, self.model.model.norm.weight, self.c.norm_eps))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence: ids [B] -> logits [B, vocab]."""
        c = self.c
        B = ids.shape[0]

        def mixer(i: int, L: _Layer, y1: torch.Tensor) -> torch.Tensor | Fp8Rows:
            # one launch for the conv, the low-rank layers and the gates (fp32, once per channel)
            q, k, v, g, b, w, z = decode_inputs_low_rank(y1, L.low_rank, self.windows[i], L.taps, L.conv_bias,
                                                         c.key_dim, c.value_dim, L.A_log, L.dt_bias,
                                                         c.allow_neg_eigval)
            qk = (B, c.num_heads, c.head_dim)
            vw = (B, c.value_heads, c.head_v_dim)
            fused = self.fp8 and self.fmt.quantized   # the output norm inside the decode kernel
            norm = OutputNorm(z, L.z_bias, L.o_norm, c.norm_eps, c.output_gate_activation) if fused else None
            o = decode_step(q.view(qk), k.view(qk), v.view(vw), g.view(qk), b.view(qk), w.view(vw), self.pools[i],
                            self.slots, self.fmt, out_norm=norm)
            return o if fused else self._out_norm(L, o, z)

        x, delta = self.model.model.embeddings(ids), None
        for i in range(len(self.layers)):
            delta = self._block(i, x, delta, mixer)
        return self._logits(x, delta)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] from empty states: fills the pools and conv windows, returns last-token logits."""
        c = self.c
        B, T = ids.shape
        kd, vd = c.key_dim, c.value_dim

        def mixer(i: int, L: _Layer, y1: torch.Tensor) -> torch.Tensor | Fp8Rows:
            r0 = 3 * kd + 2 * vd
            y2 = low_rank_up(y1[:, r0:r0 + 2 * c.head_v_dim], L.low_rank, kd)
            qkv, win = causal_conv(y1[:, :2 * kd + vd].view(B, T, -1), L.taps[:, None], L.conv_bias, None)
            self.windows[i].copy_(win)
            q, k, v = qkv.split([kd, kd, vd], dim=-1)
            b, w = y1[:, 2 * kd + vd:3 * kd + 2 * vd].view(B, T, -1).split([kd, vd], dim=-1)
            qk = (B, T, c.num_heads, c.head_dim)
            vw = (B, T, c.value_heads, c.head_v_dim)
            g, b, w = gates(y2[:, :kd].reshape(qk), b.reshape(qk), w.reshape(vw), L.A_log, L.dt_bias,
                            c.allow_neg_eigval)
            o = chunk_prefill(q.reshape(qk), k.reshape(qk), v.reshape(vw), g, b, w, self.pools[i], self.slots,
                              self.fmt, initial=False)
            return self._out_norm(L, o.flatten(0, 1), y2[:, kd:])

        x, delta = self.model.model.embeddings(ids).flatten(0, 1), None
        for i in range(len(self.layers)):
            delta = self._block(i, x, delta, mixer)
        x.add_(delta.sum(0) if delta.dim() == 3 else delta)   # fp32 partials: x rounds once, as in add_rms_norm
        return self._logits(x.view(B, T, -1)[:, -1].contiguous(), None)


def random_model(config: GDN2Config = CONFIG_1B3) -> GDN2ForCausalLM:
    """A GDN-2 LM with random weights (seed 0) for speed measurements, its decays drawn as a trained model's
    spread (A_log uniform in [0, 2.7])."""
    torch.manual_seed(0)
    model = GDN2ForCausalLM(config)
    for mod in model.modules():
        if isinstance(mod, GDN2Mixer):
            nn.init.uniform_(mod.A_log, 0.0, 2.7)
    return model


def capture_graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after ``warmup`` calls on a side stream (compiles, allocator pools), as a
    serving loop would replay it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _timed(fn, reps: int) -> float:
    """Seconds per call (device-synchronised wall clock, after one warm-up call)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


PDL_MODES = {"on": (True,), "off": (False,), "both": (False, True)}


def _cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else the platform's word for it, else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def bench_model(model_or_config: GDN2ForCausalLM | GDN2Config | None = None, batch: int = 64,
                state: str | StateQuantConfig = "int8", recipe: str = "bf16", prompt_len: int = 2048,
                decode_reps: int = 50, device: str | None = None, pdl_mode: str | None = None) -> dict:
    """Decode tokens/s (CUDA graph of one step on CUDA) and prefill tokens/s of a GDN-2 LM on the kernel path.

    model_or_config: a loaded pure GDN-2 model, a config (random weights), or None for the 1.3B shape.
    recipe: "bf16" or "fp8" (large projections as fp8 with row scales).
    pdl_mode: programmatic dependent launch for the decode step: None keeps ``gdn2q.kernels.pdl.ENABLED``,
    "on" / "off" set it, "both" captures and times the step without and with it (``decode_step_ms_pdl_off``,
    ``decode_step_ms_pdl_on``; the headline decode figures are the faster mode's). "pdl" in the result says
    whether the headline step ran with PDL (only where supported: Hopper and a Triton with launch_pdl).
    """
    if recipe not in ("bf16", "fp8"):
        raise ValueError("recipe must be 'bf16' or 'fp8'")
    if pdl_mode is not None and pdl_mode not in PDL_MODES:
        raise ValueError(f"pdl_mode must be one of {', '.join(PDL_MODES)}")
    fmt = StateQuantConfig(state) if isinstance(state, str) else state
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model_or_config, GDN2ForCausalLM):
        model = model_or_config
    else:
        model = random_model(model_or_config or CONFIG_1B3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device).to_dtype(dtype).eval()
    lm = KernelLM(model, batch, fmt, recipe)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, prompt_len), device=device)
    prefill_s = _timed(lambda: lm.prefill(ids), reps=2)
    tok = torch.randint(0, c.vocab_size, (batch,), device=device)
    graphed = device == "cuda"
    step_ms: dict[str, float] = {}
    timed: list[tuple[float, bool]] = []   # (seconds per step, PDL used)
    for on in PDL_MODES[pdl_mode] if pdl_mode else (pdl.ENABLED,):
        with pdl.setting(on):   # read while the step is captured (and on every call when not graphed)
            step = capture_graph(lambda: lm.decode(tok)).replay if graphed else lambda: lm.decode(tok)
            timed.append((_timed(step, reps=decode_reps), pdl.active(ids.device)))
        step_ms[f"decode_step_ms_pdl_{'on' if on else 'off'}"] = timed[-1][0] * 1e3
    # the headline is the faster mode: a baseline that PDL slows down is compared as it runs best
    decode_s, pdl_used = min(timed)
    ab = step_ms if len(step_ms) > 1 else {}
    which = backend(ids, c.head_dim, c.head_v_dim, fmt)
    recurrence = which if which == "torch" else decode_kernel(fmt, batch * c.value_heads, ids.device, c.head_dim,
                                                             c.head_v_dim)
    return {"backend": which, "decode_kernel": recurrence, "cuda_graph": graphed, "device": str(device),
            "card": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(), "batch": batch,
            "state": fmt.to_dict(), "recipe": recipe, "layers": c.num_hidden_layers, "prompt_len": prompt_len,
            "pdl": pdl_used, "decode_step_ms": decode_s * 1e3, "decode_tok_s": batch / decode_s, **ab,
            "prefill_ms": prefill_s * 1e3, "prefill_tok_s": batch * prompt_len / prefill_s}
