"""The precision policy: which Linears a recipe quantizes and why the others stay in the source precision.

Only ``nn.Linear`` weights are ever quantized, so A_log, dt_bias, the short convs, all norms and the
embeddings always stay in the source precision. Among the Linears, lm_head is kept, the GDN-2 gate
projections (b_proj, w_proj, f_proj, g_proj) are kept or quantized by option, and ``keep`` regexes (matched
with ``re.search`` against the module name) keep more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gdn2q.errors import ConfigError
from gdn2q.model.groups import param_group
from gdn2q.quant.recipes import Recipe

GATE_GROUPS = ("b_proj", "w_proj", "f_proj", "g_proj")
GATE_CHOICES = ("keep", "quantize")
ALWAYS_KEPT = "A_log, dt_bias, short convs, norms, embeddings (not Linear layers: never quantized)"


@dataclass(frozen=True)
class Policy:
    gates: str = "keep"
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.gates not in GATE_CHOICES:
            raise ConfigError(f"unknown gates policy {self.gates!r}; choose one of {', '.join(GATE_CHOICES)}")
        for pattern in self.keep:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"--keep {pattern!r} is not a valid regular expression ({e})") from e

    def reason_to_keep(self, name: str, group: str) -> str | None:
        if group == "lm_head":
            return "lm_head (policy)"
        if group in GATE_GROUPS and self.gates == "keep":
            return "gate projection (policy: --gates keep)"
        hit = next((p for p in self.keep if re.search(p, name)), None)
        return f"--keep {hit}" if hit else None

    def plan(self, model: nn.Module, recipe: Recipe, device: torch.device) -> dict[str, str | None]:
        """{Linear name: None if quantized, else the reason it is kept}, in module order."""
        cfg = model.config
        attn_layers = frozenset(cfg.attn.layers) if cfg.attn else frozenset()
        out: dict[str, str | None] = {}
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            reason = self.reason_to_keep(name, param_group(f"{name}.weight", attn_layers))
            if reason is None and recipe.torchao is not None and recipe.config_for(m, device) is None:
                reason = f"{recipe.name} cannot quantize in_features={m.in_features}"
            out[name] = reason
        return out

    def to_dict(self) -> dict:
        return {"gates": self.gates, "keep": list(self.keep), "always_kept": ALWAYS_KEPT}
