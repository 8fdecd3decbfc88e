"""``quantize_model``: apply a recipe under a precision policy, in place, and describe what was done."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from gdn2q.calib.artifact import CalibrationData, model_fingerprint
from gdn2q.errors import DataError
from gdn2q.quant.libs import library_versions, quant_libs
from gdn2q.quant.policy import Policy
from gdn2q.quant.recipes import Recipe, check_runnable, get_recipe
from gdn2q.quant.smoothquant import smooth_model
from gdn2q.quant.state import QMAX, TINY, StateQuantConfig

FORMAT_VERSION = 1
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def keep_layout_stable(module: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights on first forward: it is lossy (saving unpacks and
    re-quantizes the scales), so a model saved after running would no longer reload to the same logits."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def bnb_linear(layer: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes module holding ``layer``'s weight quantized (``kind`` "int8" or "nf4")."""
    import bitsandbytes as bnb

    w = layer.weight.detach()
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.float().cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=w.dtype, quant_type=kind, device="meta")
        q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=kind)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.detach().cpu(), requires_grad=False)
    keep_layout_stable(q)
    return q.to(w.device).train(layer.training).requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def static_state_scales(calib: CalibrationData, fmt: StateQuantConfig) -> dict[int, torch.Tensor]:
    """[HV, K] static state scales per GDN-2 layer from the calibrated max |S| (value = code * scale)."""
    return {i: (a.float().clamp_min(TINY) / QMAX[fmt.dtype]) for i, a in calib.state_absmax().items()}


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: str | Recipe, calib: CalibrationData | None = None,
                   keep: tuple[str, ...] = (), gates: str = "keep", smoothquant_alpha: float | None = 0.5,
                   smoothquant_stat: str = "absmax", state_format: StateQuantConfig | None = None) -> nn.Module:
    """Quantize ``model``'s Linears in place with ``recipe`` and return it.

    ``smoothquant_alpha``: for recipes that use SmoothQuant (w8a8-int8), the migration strength; None turns
    SmoothQuant off. ``state_format`` sets how the decode state is stored (static scales come from ``calib``).
    The result carries ``model.quantization``: the config section a quantized folder saves.
    """
    quant_libs()
    r = get_recipe(recipe)
    device = model.device
    check_runnable(r, device)
    if calib is not None:
        calib.check_for(model)
    policy = Policy(gates=gates, keep=tuple(keep))
    plan = policy.plan(model, r, device)
    quantized = {n for n, why in plan.items() if why is None}
    smoothed: list[str] = []
    if r.smoothquant and smoothquant_alpha is not None:
        if calib is None:
            raise DataError(f"recipe {r.name} uses SmoothQuant scales from a calibration file: pass --calib FILE "
                            "(from gdn2q calibrate), or turn SmoothQuant off (--no-smoothquant)")
        smoothed = smooth_model(model, calib, smoothquant_alpha, quantized, smoothquant_stat)
    modules = dict(model.named_modules())
    if r.torchao is not None:
        from torchao.quantization import FqnToConfig, quantize_

        configs = OrderedDict((n, r.config_for(modules[n], device) if n in quantized else None) for n in plan)
        quantize_(model, FqnToConfig(configs), filter_fn=None)
    else:
        for n in quantized:
            replace_module(model, n, bnb_linear(modules[n], r.bnb))
    fmt = state_format or StateQuantConfig()
    model.state_format = fmt
    if fmt.scales == "static":
        if calib is None:
            raise DataError("static state scales need --calib FILE (gdn2q calibrate records the state ranges)")
        model.state_scales = static_state_scales(calib, fmt)
    source = Path(model.source_path)
    model.quantization = {
        "format_version": FORMAT_VERSION,
        "recipe": r.name,
        "library": r.library,
        "library_versions": library_versions(),
        "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
        "policy": {**policy.to_dict(), "quantized": sorted(quantized),
                   "kept": {n: why for n, why in plan.items() if why is not None}},
        "smoothquant": ({"alpha": smoothquant_alpha, "stat": smoothquant_stat, "folded_into": smoothed}
                        if smoothed else None),
        "calibration": ({k: calib.meta.get(k) for k in ("data_name", "data_sha256", "tokens", "seq_len")}
                        if calib is not None else None),
        "source": {"path": str(source.resolve()), "name": source.name,
                   "sha256": model_fingerprint(model)},
        "state": fmt.to_dict(),
    }
    return model
