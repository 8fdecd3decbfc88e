"""SmoothQuant (Xiao et al. 2023) for GDN-2 models: move activation outliers into the weights.

For a Linear input X and weight W, ``X W^T = (X / s)(W s)^T`` for any per-input-channel s. With
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the dynamic per-token int8 activation quantization sees
flatter rows. ``1/s`` is folded into whatever produces X, where the math allows an exact fold:
a preceding RMSNorm weight (block norms; the GDN-2 o_norm weight, shared by all value heads, so s is tied
across heads there), or the output rows of a preceding Linear whose output reaches X channel by channel
(SwiGLU up_proj -> down_proj, the low-rank f_proj/g_proj pairs, attention v_proj -> o_proj).
Written by hand: torchao's SmoothQuant prototype inserts a runtime scaling per Linear instead of folding
scales into the model, and knows nothing of which producers a GDN-2 block has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gdn2q.calib.artifact import CalibrationData
from gdn2q.errors import DataError
from gdn2q.model.attention import SlidingWindowAttention
from gdn2q.model.gdn2 import GDN2Mixer

MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothGroup:
    """Linears reading one input, and the producer that absorbs 1/s.

    ``producer``: a norm weight name (``kind="norm"``) or a Linear name whose output rows are divided
    (``kind="rows"``); ``period``: s repeats every ``period`` channels (o_norm is shared by all heads).
    """

    consumers: tuple[str, ...]
    producer: str
    kind: str
    period: int | None = None


def smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    groups: list[SmoothGroup] = []
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        mixer = block.attn
        if isinstance(mixer, GDN2Mixer):
            names = ("q_proj", "k_proj", "v_proj", "b_proj", "w_proj", "f_proj.0", "g_proj.0")
            groups.append(SmoothGroup(tuple(f"{p}.attn.{n}" for n in names), f"{p}.attn_norm.weight", "norm"))
            groups.append(SmoothGroup((f"{p}.attn.o_proj",), f"{p}.attn.o_norm.weight", "norm",
                                      period=mixer.config.head_v_dim))
            groups.append(SmoothGroup((f"{p}.attn.f_proj.1",), f"{p}.attn.f_proj.0", "rows"))
            groups.append(SmoothGroup((f"{p}.attn.g_proj.1",), f"{p}.attn.g_proj.0", "rows"))
        elif isinstance(mixer, SlidingWindowAttention):
            groups.append(SmoothGroup(tuple(f"{p}.attn.{n}" for n in ("q_proj", "k_proj", "v_proj")),
                                      f"{p}.attn_norm.weight", "norm"))
            if mixer.cfg.kv_heads == mixer.cfg.num_heads:   # each o_proj input channel is one v channel
                groups.append(SmoothGroup((f"{p}.attn.o_proj",), f"{p}.attn.v_proj", "rows"))
        groups.append(SmoothGroup((f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), f"{p}.mlp_norm.weight", "norm"))
        groups.append(SmoothGroup((f"{p}.mlp.down_proj",), f"{p}.mlp.up_proj", "rows"))
    groups.append(SmoothGroup(("lm_head",), "model.norm.weight", "norm"))
    return groups


def smoothing_scales(act: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                     period: int | None = None) -> torch.Tensor:
    """Per-input-channel s (length ``period`` if given, else in_features) from activation and weight ranges."""
    wmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    a = act.float().to(wmax.device)
    if period:
        a, wmax = a.view(-1, period).amax(0), wmax.view(-1, period).amax(0)
    s = a.clamp_min(MIN_SCALE).pow(alpha) / wmax.clamp_min(MIN_SCALE).pow(1 - alpha)
    return s.clamp_min(MIN_SCALE)


@torch.no_grad()
def smooth_model(model: nn.Module, calib: CalibrationData, alpha: float, quantized: set[str],
                 stat: str = "absmax") -> list[str]:
    """Fold SmoothQuant scales into ``model`` for every group with a Linear in ``quantized``.

    Returns the producers that absorbed scales. The model computes the same function (up to rounding).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    done = []
    for g in smooth_groups(model):
        if not any(c in quantized for c in g.consumers):
            continue
        act = calib.linear_stat(g.consumers[0], stat)
        if act is None:
            raise DataError(f"{calib.path or 'calibration'}: no '{stat}' statistics for {g.consumers[0]}; "
                            f"calibrate with --clip {stat} or use --sq-stat absmax")
        consumers = [modules[c] for c in g.consumers]
        s = smoothing_scales(act, [m.weight for m in consumers], alpha, g.period)
        full = s.repeat(consumers[0].in_features // s.numel())
        for m in consumers:
            m.weight.copy_((m.weight.float() * full).to(m.weight.dtype))
        if g.kind == "norm":
            w = params[g.producer]
            w.copy_((w.float() / s).to(w.dtype))
        else:
            prod = modules[g.producer]
            prod.weight.copy_((prod.weight.float() / full[:, None]).to(prod.weight.dtype))
            if prod.bias is not None:
                prod.bias.copy_((prod.bias.float() / full).to(prod.bias.dtype))
        done.append(g.producer)
    return done
