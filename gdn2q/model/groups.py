"""Names for groups of weights, shared by inspect, the precision policy and sensitivity analysis."""

from __future__ import annotations

import re

GROUPS = ("embeddings", "lm_head", "qkv", "b_proj", "w_proj", "f_proj", "g_proj", "o_proj", "short_conv",
          "decay", "norms", "mlp", "attention")

_RULES: list[tuple[str, str]] = [
    (r"^model\.embeddings\.", "embeddings"),
    (r"^lm_head\.", "lm_head"),
    (r"norm\.weight$", "norms"),
    (r"\.mlp\.", "mlp"),
    (r"\.attn\.[qkv]_conv1d\.", "short_conv"),
    (r"\.attn\.(A_log|dt_bias)$", "decay"),
    (r"\.attn\.(b_proj|w_proj|f_proj|g_proj)\.", None),  # group = the projection's own name
]


def param_group(name: str, attention_layers: frozenset[int] = frozenset()) -> str:
    """The group a parameter (fla-layout name) belongs to."""
    m = re.match(r"^model\.layers\.(\d+)\.attn\.", name)
    if m and int(m.group(1)) in attention_layers:
        return "attention"
    for pattern, group in _RULES:
        hit = re.search(pattern, name)
        if hit:
            return group or hit.group(1)
    if re.search(r"\.attn\.[qkv]_proj\.", name):
        return "qkv"
    if re.search(r"\.attn\.o_proj\.", name):
        return "o_proj"
    return "other"
