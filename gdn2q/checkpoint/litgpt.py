"""NVIDIA lit_gpt training checkpoints (``.pth``; GDN2_SPEC.md 4.1, 5.1, 5.3, 5.4).

Key mapping lit_gpt <-> fla layout, the split of the fused SWA ``attn.attn`` weight, and architecture
inference from tensor shapes. lit_gpt models use the SiLU ("swish") output gate and norm eps 1e-5.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gdn2q.checkpoint.io import read_pth
from gdn2q.config import AttentionConfig, GDN2Config
from gdn2q.errors import CheckpointError, ConfigError

# registered lit_gpt configs (name_to_config) whose SWA head count cannot be read from shapes
REGISTERED = {
    "gdn2_1.3B": dict(hidden_size=2304, num_hidden_layers=18, gdn2_per_layer=1, intermediate_size=6208,
                      attn_heads=18, window=2048),
    "swa_gdn2_1.3B": dict(hidden_size=2304, num_hidden_layers=18, gdn2_per_layer=2, intermediate_size=6784,
                          attn_heads=18, window=2048),
}
LIT_NORM_EPS = 1e-5
_COPY = [
    ("transformer.wte.weight", "model.embeddings.weight"),
    ("transformer.ln_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_BLOCK_COPY = [
    ("norm_1.weight", "attn_norm.weight"),
    ("norm_2.weight", "mlp_norm.weight"),
    ("mlp.swiglu.w1.weight", "mlp.gate_proj.weight"),
    ("mlp.swiglu.w2.weight", "mlp.up_proj.weight"),
    ("mlp.swiglu.w3.weight", "mlp.down_proj.weight"),
]
_SWA_OUT = ("attn.proj.weight", "attn.o_proj.weight")  # SWA layers only: GDN-2 layers keep attn.o_proj
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def read_litgpt_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    obj = read_pth(path)
    hparams = {}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        hparams = obj.get("hparams") or {}
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a GDN-2 checkpoint: expected a state dict (or {{'model': state dict}}) "
                              "of tensors")
    if "transformer.wte.weight" not in obj:
        raise CheckpointError(f"{path}: not a lit_gpt checkpoint (no transformer.wte.weight); gdn2q reads lit_gpt "
                              ".pth files and fla-layout folders")
    return obj, hparams if isinstance(hparams, dict) else {}


def _layer_count(sd: dict[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    return max(idx) + 1 if idx else 0


def registered_name(hparams: dict) -> str | None:
    """lit_gpt stores ``name = <train_config>_<exp_name>``: recognise a registered config prefix."""
    name = str(hparams.get("name", ""))
    for reg in sorted(REGISTERED, key=len, reverse=True):
        if name == reg or name.startswith(reg + "_"):
            return reg
    return None


def infer_config(sd: dict[str, torch.Tensor], path: Path, hparams: dict | None = None,
                 explicit: GDN2Config | None = None) -> GDN2Config:
    """Architecture from shapes (spec 5.4); an explicit config supplies what shapes cannot tell."""
    n_layer = _layer_count(sd)
    vocab, d = sd["transformer.wte.weight"].shape
    gdn = [i for i in range(n_layer) if f"transformer.h.{i}.attn.A_log" in sd]
    swa = [i for i in range(n_layer) if f"transformer.h.{i}.attn.attn.weight" in sd]
    if not gdn:
        raise CheckpointError(f"{path}: no GDN-2 layer found (no transformer.h.*.attn.A_log); not a GDN-2 model")
    p = f"transformer.h.{gdn[0]}.attn."
    H = sd[p + "A_log"].shape[0]
    key_dim = sd[p + "q_proj.weight"].shape[0]
    V = sd[p + "o_norm.weight"].shape[0]
    shape_cfg = dict(
        hidden_size=d, num_hidden_layers=n_layer, num_heads=H, head_dim=key_dim // H,
        num_v_heads=(sd[p + "v_proj.weight"].shape[0] // V) if sd[p + "v_proj.weight"].shape[0] // V != H else None,
        expand_v=V / (key_dim // H), conv_size=sd[p + "q_conv1d.weight"].shape[-1] if p + "q_conv1d.weight" in sd
        else 4, use_short_conv=p + "q_conv1d.weight" in sd, conv_bias=p + "q_conv1d.bias" in sd,
        intermediate_size=sd[f"transformer.h.{gdn[0]}.mlp.swiglu.w1.weight"].shape[0], vocab_size=vocab,
    )
    if explicit is not None:
        for key, value in shape_cfg.items():
            have = getattr(explicit, key) if key != "intermediate_size" else explicit.mlp_size
            if key == "num_v_heads":
                have, value = explicit.value_heads, value or H
            if have != value and not (key == "expand_v" and abs(have - value) < 1e-9):
                raise ConfigError(f"{path}: config field {key}={have} contradicts the tensors ({value}); "
                                  "fix the config file")
        if sorted(explicit.attn.layers if explicit.attn else ()) != swa:
            raise ConfigError(f"{path}: config attn.layers {list(explicit.attn.layers) if explicit.attn else []} "
                              f"contradicts the tensors (attention layers {swa}); fix the config file")
        return explicit
    attn = None
    if swa:
        reg = registered_name(hparams or {})
        if reg is None:
            shape_match = [n for n, r in REGISTERED.items() if r["hidden_size"] == d
                           and r["num_hidden_layers"] == n_layer and r["gdn2_per_layer"] == 2]
            reg = shape_match[0] if shape_match else None
        if reg is None:
            raise ConfigError(
                f"{path}: the sliding-window attention head count of layers {swa} cannot be read from tensor "
                "shapes; pass --config with a GDN2Config JSON (attn.num_heads, window_size)")
        r = REGISTERED[reg]
        rows = sd[f"transformer.h.{swa[0]}.attn.attn.weight"].shape[0]
        hs = d // r["attn_heads"]
        kv = (rows // hs - r["attn_heads"]) // 2
        attn = AttentionConfig(layers=tuple(swa), num_heads=r["attn_heads"], num_kv_heads=kv,
                               window_size=r["window"], rope_theta=10000.0)
    return GDN2Config(**shape_cfg, attn=attn, output_gate_activation="swish", norm_eps=LIT_NORM_EPS,
                      tie_word_embeddings=False, max_position_embeddings=4096)


def litgpt_to_fla(sd: dict[str, torch.Tensor], config: GDN2Config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for lit, fla in _COPY:
        if lit in sd:
            out[fla] = sd[lit]
    for k, t in sd.items():
        m = _BLOCK.match(k)
        if not m:
            if k not in dict(_COPY):
                out[k] = t  # left for check_state_dict to report as unexpected
            continue
        i, rest = int(m.group(1)), m.group(2)
        base = f"model.layers.{i}."
        mapped = dict(_BLOCK_COPY).get(rest) or (_SWA_OUT[1] if rest == _SWA_OUT[0] else None)
        if mapped is not None:
            out[base + mapped] = t
        elif rest == "attn.attn.weight" and config.attn is not None:
            a = config.attn
            hs = config.hidden_size // a.num_heads
            per = a.num_heads // a.kv_heads
            grouped = t.reshape(a.kv_heads, per + 2, hs, t.shape[-1])
            out[base + "attn.q_proj.weight"] = grouped[:, :per].reshape(-1, t.shape[-1])
            out[base + "attn.k_proj.weight"] = grouped[:, per].reshape(-1, t.shape[-1])
            out[base + "attn.v_proj.weight"] = grouped[:, per + 1].reshape(-1, t.shape[-1])
        else:
            out[base + rest] = t  # GDN-2 mixer keys are identical (attn.<key>)
    return out


def fla_to_litgpt(sd: dict[str, torch.Tensor], config: GDN2Config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`litgpt_to_fla` (used to write lit_gpt checkpoints for tests and round trips)."""
    inv = {fla: lit for lit, fla in _COPY}
    binv = {fla: lit for lit, fla in _BLOCK_COPY}
    out: dict[str, torch.Tensor] = {}
    for i in range(config.num_hidden_layers):
        base = f"model.layers.{i}."
        if config.is_attention_layer(i):
            a = config.attn
            hs = config.hidden_size // a.num_heads
            per = a.num_heads // a.kv_heads
            d = config.hidden_size
            q = sd[base + "attn.q_proj.weight"].reshape(a.kv_heads, per, hs, d)
            k = sd[base + "attn.k_proj.weight"].reshape(a.kv_heads, 1, hs, d)
            v = sd[base + "attn.v_proj.weight"].reshape(a.kv_heads, 1, hs, d)
            out[f"transformer.h.{i}.attn.attn.weight"] = torch.cat([q, k, v], 1).reshape(-1, d)
    for k, t in sd.items():
        if k in inv:
            out[inv[k]] = t
            continue
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", k)
        i, rest = int(m.group(1)), m.group(2)
        if config.is_attention_layer(i) and rest in ("attn.q_proj.weight", "attn.k_proj.weight",
                                                      "attn.v_proj.weight"):
            continue
        if config.is_attention_layer(i) and rest == _SWA_OUT[1]:
            rest = _SWA_OUT[0]
        out[f"transformer.h.{i}.{binv.get(rest, rest)}"] = t
    return out
