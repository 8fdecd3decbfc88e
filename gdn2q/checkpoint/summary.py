"""What `gdn2q inspect` reports about a checkpoint: format, config, parameters and bytes per group."""

from __future__ import annotations

from collections import defaultdict

from gdn2q.checkpoint import Checkpoint
from gdn2q.model.groups import param_group
from gdn2q.quant.state import STATE_DTYPES, StateQuantConfig


def group_sizes(tensors: dict, attention_layers: frozenset[int]) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(lambda: {"params": 0, "bytes": 0, "dtypes": set()})
    for name, t in tensors.items():
        g = out[param_group(name, attention_layers)]
        g["params"] += t.numel()
        g["bytes"] += t.numel() * t.element_size()
        g["dtypes"].add(str(t.dtype).replace("torch.", ""))
    return {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in sorted(out.items())}


def state_bytes(config) -> dict[str, dict]:
    """Recurrent-state bytes per sequence, per GDN-2 layer and in total, for each storage dtype."""
    K, V, HV = config.head_dim, config.head_v_dim, config.value_heads
    n = len(config.gdn2_layers)
    rows = {}
    for dtype in STATE_DTYPES:
        per_layer = HV * StateQuantConfig(dtype).bytes_per_head(K, V)
        rows[dtype] = {"per_layer": per_layer, "total": per_layer * n,
                       "ratio_to_fp32": per_layer / (HV * K * V * 4)}
    return rows


def summarize(ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    attn_layers = frozenset(cfg.attn.layers) if cfg.attn else frozenset()
    groups = group_sizes(ckpt.tensors, attn_layers)
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        **{k: v for k, v in ckpt.info.items() if k != "format"},
        "config": cfg.to_dict(),
        "parameters": sum(g["params"] for g in groups.values()),
        "bytes": sum(g["bytes"] for g in groups.values()),
        "groups": groups,
        "layers": {"gdn2": cfg.gdn2_layers, "attention": sorted(attn_layers)},
        "state_bytes_per_sequence": {"recurrent": state_bytes(cfg),
                                     "conv_per_layer": cfg.state_bytes_per_sequence()["conv_per_layer"],
                                     **({"attention_kv_per_layer_fp32": cfg.state_bytes_per_sequence()
                                         ["attention_kv_per_layer"]} if cfg.attn else {})},
        "tokenizer": str(ckpt.tokenizer) if ckpt.tokenizer else None,
    }
