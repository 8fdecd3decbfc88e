"""GDN2Config: one validated description of every GDN-2 language-model variant gdn2q supports.

Field names follow the fla Hugging Face layout (GDN2_SPEC.md 5.2) so a config.json round-trips unchanged;
``output_gate_activation`` is the extension that tells fla-trained ("sigmoid") from NVIDIA-trained ("swish")
weights, which cannot be told apart from tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gdn2q.errors import ConfigError

GATE_ACTIVATIONS = ("sigmoid", "swish")


@dataclass(frozen=True)
class AttentionConfig:
    """Sliding-window softmax attention layers of a hybrid model."""

    layers: tuple[int, ...]
    num_heads: int
    num_kv_heads: int | None = None
    window_size: int | None = None  # None: full causal attention
    rope_theta: float = 10000.0
    qkv_bias: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "num_heads": self.num_heads,
            "num_kv_heads": self.kv_heads,
            "window_size": self.window_size,
            "rope_theta": self.rope_theta,
            "qkv_bias": self.qkv_bias,
        }


@dataclass(frozen=True)
class GDN2Config:
    hidden_size: int = 2304
    num_hidden_layers: int = 18
    num_heads: int = 16
    head_dim: int = 128
    num_v_heads: int | None = None
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    output_gate_activation: str = "sigmoid"
    norm_eps: float = 1e-6
    intermediate_size: int | None = None
    hidden_ratio: int = 4
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    attn: AttentionConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 8192
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid GDN-2 config: {msg}")

        for name in ("hidden_size", "num_hidden_layers", "num_heads", "head_dim", "conv_size", "vocab_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(self.expand_v > 0 and float(self.head_dim * self.expand_v).is_integer(),
             "head_dim * expand_v must be a whole number")
        need(self.value_heads % self.num_heads == 0,
             f"num_v_heads ({self.value_heads}) must be a multiple of num_heads ({self.num_heads})")
        need(self.output_gate_activation in GATE_ACTIVATIONS,
             f"output_gate_activation must be one of {GATE_ACTIVATIONS}, got {self.output_gate_activation!r}")
        need(self.norm_eps > 0, "norm_eps must be > 0")
        need(self.mlp_size > 0, "intermediate_size must be > 0")
        if self.attn is not None:
            need(all(0 <= i < self.num_hidden_layers for i in self.attn.layers),
                 f"attn.layers {list(self.attn.layers)} must lie in 0..{self.num_hidden_layers - 1}")
            need(self.hidden_size % self.attn.num_heads == 0, "hidden_size must divide by attn.num_heads")
            need(self.attn.num_heads % self.attn.kv_heads == 0, "attn.num_heads must divide by num_kv_heads")
            need(self.attn.window_size is None or self.attn.window_size > 0, "attn.window_size must be > 0")

    # ---- derived sizes (GDN2_SPEC.md notation) ----
    @property
    def value_heads(self) -> int:
        """HV: value heads (> num_heads for grouped value attention)."""
        return self.num_v_heads or self.num_heads

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.head_v_dim

    @property
    def mlp_size(self) -> int:
        """fla's GatedMLP rule when intermediate_size is unset: 2/3 * ratio * d rounded up to 256."""
        if self.intermediate_size:
            return self.intermediate_size
        raw = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * math.ceil(raw / 256)

    def is_attention_layer(self, i: int) -> bool:
        return self.attn is not None and i in self.attn.layers

    @property
    def gdn2_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_attention_layer(i)]

    def state_bytes_per_sequence(self, state_bytes_per_elem: float = 4.0, window: int | None = None) -> dict:
        """Decode-state size of one sequence: recurrent + conv windows (+ attention windows)."""
        recurrent = self.value_heads * self.head_dim * self.head_v_dim * state_bytes_per_elem
        conv = (2 * self.key_dim + self.value_dim) * self.conv_size * 4 if self.use_short_conv else 0
        n_gdn = len(self.gdn2_layers)
        out = {"recurrent_per_layer": int(recurrent), "conv_per_layer": int(conv),
               "gdn2_layers": n_gdn, "total": int(n_gdn * (recurrent + conv))}
        if self.attn is not None:
            w = self.attn.window_size or window or self.max_position_embeddings
            kv = 2 * w * self.attn.kv_heads * (self.hidden_size // self.attn.num_heads) * 4
            out["attention_kv_per_layer"] = int(kv)
            out["total"] += int(kv * len(self.attn.layers))
        return out

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("attn", "extra")}
        d["intermediate_size"] = self.mlp_size
        d["attn"] = self.attn.to_dict() if self.attn else None
        return {"model_type": "gdn2", "architectures": ["GDN2ForCausalLM"], **self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> GDN2Config:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures")}
        attn = kwargs.pop("attn", None)
        if attn:
            try:
                kwargs["attn"] = AttentionConfig(
                    layers=tuple(int(i) for i in attn["layers"]),
                    num_heads=int(attn["num_heads"]),
                    num_kv_heads=attn.get("num_kv_heads"),
                    window_size=attn.get("window_size"),
                    rope_theta=float(attn.get("rope_theta", 10000.0)),
                    qkv_bias=bool(attn.get("qkv_bias", False)),
                )
            except (KeyError, TypeError) as e:
                raise ConfigError(f"{source}: attn section is incomplete ({e}); it needs layers and num_heads") from e
        if kwargs.get("num_v_heads") is not None:
            kwargs["num_v_heads"] = int(kwargs["num_v_heads"])
        if "expand_v" in kwargs:
            kwargs["expand_v"] = float(kwargs["expand_v"])
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> GDN2Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON config ({e}); fix or replace the file") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a config must be a JSON object")
        return cls.from_dict(d, source=str(path))

    def replace(self, **changes: Any) -> GDN2Config:
        return dataclasses.replace(self, **changes)
