"""End-to-end decode and prefill throughput of a GDN-2 LM on the kernel path (what ``gdn2q bench`` runs).

The model's own modules (norms, projections, MLP) are reused; the recurrence runs through
:func:`gdn2q.kernels.decode_step` (gates fused in the kernel, state pool updated in place) and
:func:`gdn2q.kernels.chunk_prefill`. On CUDA the whole decode step of all layers is captured in one CUDA
graph, as a serving loop would replay it. Models with attention layers are not supported on this path.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from gdn2q.config import GDN2Config
from gdn2q.kernels import backend, chunk_prefill, decode_step, new_state_pool
from gdn2q.kernels.fp8_linear import Fp8Linear
from gdn2q.model.gdn2 import GDN2Mixer, causal_conv
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.model.norms import gated_rms_norm
from gdn2q.quant.state import StateQuantConfig

# the 1.3B GDN-2 shape (GDN2_SPEC.md 4.1, gdn2_1.3B: 18 layers, d 2304, MLP 6208, vocab 32000)
CONFIG_1B3 = GDN2Config(hidden_size=2304, num_hidden_layers=18, num_heads=16, head_dim=128,
                        intermediate_size=6208, vocab_size=32000)
FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "b_proj", "w_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _to_fp8(model: nn.Module) -> None:
    """Swap the large projections for fp8 ones; the low-rank gate bottlenecks and lm_head stay bf16."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in FP8_LINEARS and isinstance(child, nn.Linear):
                setattr(module, name, Fp8Linear(child))


class KernelLM:
    """Runs a pure GDN-2 :class:`GDN2ForCausalLM` on the kernel path with a state pool of ``batch`` slots."""

    def __init__(self, model: GDN2ForCausalLM, batch: int, fmt: StateQuantConfig):
        c = model.config
        if c.attn is not None:
            raise NotImplementedError("the kernel decode path covers pure GDN-2 models (no attention layers)")
        self.model, self.c, self.fmt, self.batch = model, c, fmt, batch
        dev = model.device
        self.pools = [new_state_pool(batch, c.value_heads, c.head_dim, c.head_v_dim, fmt, dev)
                      for _ in range(c.num_hidden_layers)]
        self.slots = torch.arange(batch, device=dev, dtype=torch.int32)
        W = c.conv_size
        self.windows = [[torch.zeros(batch, n, W, dtype=model.dtype, device=dev)
                         for n in (c.key_dim, c.key_dim, c.value_dim)] for _ in range(c.num_hidden_layers)]

    def _mixer_decode(self, m: GDN2Mixer, x: torch.Tensor, i: int) -> torch.Tensor:
        c = self.c
        raw = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
        qkv = []
        for j, (r, conv) in enumerate(zip(raw, (m.q_conv1d, m.k_conv1d, m.v_conv1d), strict=True)):
            win = self.windows[i][j]
            win.copy_(torch.cat([win[..., 1:], r.unsqueeze(-1)], dim=-1))
            y = (win.float() * conv.weight[:, 0].float()).sum(-1)
            if conv.bias is not None:
                y = y + conv.bias.float()
            qkv.append(F.silu(y).to(x.dtype))
        B = x.shape[0]
        q, k = (t.view(B, c.num_heads, c.head_dim) for t in qkv[:2])
        v = qkv[2].view(B, c.value_heads, c.head_v_dim)
        f = m.f_proj(x).float().view(B, c.num_heads, c.head_dim)
        b = m.b_proj(x).view(B, c.num_heads, c.head_dim)
        w = m.w_proj(x).view(B, c.value_heads, c.head_v_dim)
        o = decode_step(q, k, v, f, b, w, self.pools[i], self.slots, self.fmt, A_log=m.A_log, dt_bias=m.dt_bias,
                        allow_neg_eigval=c.allow_neg_eigval)
        z = m.g_proj(x).view(B, c.value_heads, c.head_v_dim)
        o = gated_rms_norm(o, z, m.o_norm.weight, c.norm_eps, c.output_gate_activation)
        return m.o_proj(o.flatten(-2))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence: ids [B] -> logits [B, vocab]."""
        mdl = self.model.model
        x = mdl.embeddings(ids)
        for i, block in enumerate(mdl.layers):
            x = x + self._mixer_decode(block.attn, block.attn_norm(x), i)
            x = x + block.mlp(block.mlp_norm(x))
        return self.model.lm_head(mdl.norm(x))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] from empty states: fills the pools and conv windows, returns last-token logits."""
        c, mdl = self.c, self.model.model
        x = mdl.embeddings(ids)
        B, T = ids.shape
        for i, block in enumerate(mdl.layers):
            m, h = block.attn, block.attn_norm(x)
            outs = []
            for j, (proj, conv) in enumerate(((m.q_proj, m.q_conv1d), (m.k_proj, m.k_conv1d),
                                              (m.v_proj, m.v_conv1d))):
                y, win = causal_conv(proj(h), conv.weight, conv.bias, None)
                self.windows[i][j].copy_(win)
                outs.append(y)
            q, k = (t.unflatten(-1, (c.num_heads, c.head_dim)) for t in outs[:2])
            v = outs[2].unflatten(-1, (c.value_heads, c.head_v_dim))
            g, b, w = m.gates(h)
            o = chunk_prefill(q, k, v, g, b, w, self.pools[i], self.slots, self.fmt, initial=False)
            z = m.g_proj(h).unflatten(-1, (c.value_heads, c.head_v_dim))
            x = x + m.o_proj(gated_rms_norm(o, z, m.o_norm.weight, c.norm_eps, c.output_gate_activation).flatten(-2))
            x = x + block.mlp(block.mlp_norm(x))
        return self.model.lm_head(mdl.norm(x[:, -1]))


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


def bench_model(model_or_config: GDN2ForCausalLM | GDN2Config | None = None, batch: int = 64,
                state: str | StateQuantConfig = "int8", recipe: str = "bf16", prompt_len: int = 2048,
                decode_reps: int = 50, device: str | None = None) -> dict:
    """Decode tokens/s (CUDA graph of one step on CUDA) and prefill tokens/s of a GDN-2 LM on the kernel path.

    model_or_config: a loaded pure GDN-2 model, a config (random weights), or None for the 1.3B shape.
    recipe: "bf16" or "fp8" (large projections as fp8 with row scales).
    """
    if recipe not in ("bf16", "fp8"):
        raise ValueError("recipe must be 'bf16' or 'fp8'")
    fmt = StateQuantConfig(state) if isinstance(state, str) else state
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model_or_config, GDN2ForCausalLM):
        model = model_or_config
    else:
        torch.manual_seed(0)
        model = GDN2ForCausalLM(model_or_config or CONFIG_1B3)
        for mod in model.modules():
            if isinstance(mod, GDN2Mixer):
                nn.init.uniform_(mod.A_log, 0.0, 2.7)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device).to_dtype(dtype).eval()
    if recipe == "fp8":
        _to_fp8(model)
    lm = KernelLM(model, batch, fmt)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, prompt_len), device=device)
    prefill_s = _timed(lambda: lm.prefill(ids), reps=2)
    tok = torch.randint(0, c.vocab_size, (batch,), device=device)
    graphed = device == "cuda"
    step = lambda: lm.decode(tok)  # noqa: E731
    if graphed:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                lm.decode(tok)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lm.decode(tok)
        step = graph.replay
    decode_s = _timed(step, reps=decode_reps)
    return {"backend": backend(ids, c.head_dim, c.head_v_dim, fmt), "cuda_graph": graphed, "device": str(device),
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": batch,
            "state": fmt.to_dict(), "recipe": recipe, "layers": c.num_hidden_layers, "prompt_len": prompt_len,
            "decode_step_ms": decode_s * 1e3, "decode_tok_s": batch / decode_s,
            "prefill_ms": prefill_s * 1e3, "prefill_tok_s": batch * prompt_len / prefill_s}
