"""The GDN-2 language model (fla layout): embeddings -> blocks (mixer + SwiGLU MLP, pre-norm) -> norm -> lm_head."""

from __future__ import annotations

import torch
from torch import nn

from gdn2q.config import GDN2Config
from gdn2q.model.attention import SlidingWindowAttention
from gdn2q.model.gdn2 import RECURRENCES, GDN2Mixer
from gdn2q.model.mlp import GatedMLP
from gdn2q.model.norms import RMSNorm
from gdn2q.model.state import AttentionLayerState, DecodeState, GDN2LayerState
from gdn2q.quant.state import StateQuantConfig

FP32_PARAMS = ("A_log", "dt_bias")  # kept in fp32 whatever the model dtype (decay precision)


class Block(nn.Module):
    def __init__(self, config: GDN2Config, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if config.is_attention_layer(index):
            self.attn = SlidingWindowAttention(config.hidden_size, config.attn)
        else:
            self.attn = GDN2Mixer(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_size)

    def forward(self, x: torch.Tensor, state=None, offset: int = 0) -> torch.Tensor:
        h = self.attn_norm(x)
        if isinstance(self.attn, SlidingWindowAttention):
            h = self.attn(h, state, offset)
        else:
            h = self.attn(h, state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class GDN2ForCausalLM(nn.Module):
    """``model(input_ids [B, T]) -> logits [B, T, vocab]``; pass a :class:`DecodeState` to continue a stream."""

    def __init__(self, config: GDN2Config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.state_format = StateQuantConfig()
        self.state_scales: dict[int, torch.Tensor] = {}   # layer -> calibrated [HV, K] scales (static mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.weight.device

    def to_dtype(self, dtype: torch.dtype) -> GDN2ForCausalLM:
        """Cast weights to ``dtype`` while keeping the decay parameters in fp32."""
        self.to(dtype)
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] in FP32_PARAMS:
                p.data = p.data.float()
        return self

    def set_recurrence(self, mode: str) -> None:
        """"serial" (token by token), "chunk" (WY form) or "auto" (serial up to 64 tokens)."""
        if mode not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}")
        for m in self.modules():
            if isinstance(m, GDN2Mixer):
                m.recurrence = mode

    def new_state(self, batch_size: int = 1, fmt: StateQuantConfig | None = None,
                  generator: torch.Generator | None = None) -> DecodeState:
        fmt = fmt or self.state_format
        layers = []
        for i, block in enumerate(self.model.layers):
            if isinstance(block.attn, SlidingWindowAttention):
                layers.append(AttentionLayerState(window=block.attn.cfg.window_size))
            else:
                layers.append(GDN2LayerState(fmt=fmt, static_scales=self.state_scales.get(i), generator=generator))
        return DecodeState(layers)

    def forward(self, input_ids: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        x = self.model.embeddings(input_ids)
        offset = 0 if state is None else state.offset
        for i, block in enumerate(self.model.layers):
            x = block(x, None if state is None else state.layers[i], offset)
        if state is not None:
            state.offset += input_ids.shape[1]
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 state: DecodeState | None = None, eos_token_id: int | None = None) -> torch.Tensor:
        """Prefill the prompt, then decode one token at a time from the explicit state (greedy at T=0)."""
        state = state or self.new_state(input_ids.shape[0])
        logits = self(input_ids, state)[:, -1]
        out = []
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            out.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            logits = self(nxt, state)[:, -1]
        return torch.cat(out, dim=1) if out else input_ids[:, :0]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` [B, vocab] -> [B, 1]: argmax at temperature 0, else a softmax sample
    of logits / temperature, restricted to the ``top_k`` likeliest when given."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / temperature
    if top_k:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)
