"""Weight-quantization recipes: small config objects, each applied by :func:`gdn2q.quant.quantize_model`.

A recipe says which library quantizes the selected Linears and how (a torchao config per module, or a
bitsandbytes module kind); it also says what hardware it needs, so an unrunnable recipe fails before any work.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdn2q.errors import UnsupportedError

INT4_GROUP_SIZES = (128, 64, 32)


def _int4_group(layer: nn.Linear) -> int | None:
    return next((g for g in INT4_GROUP_SIZES if layer.in_features % g == 0), None)


def _int8_wo(layer: nn.Linear, device: torch.device):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _w8a8_int8(layer: nn.Linear, device: torch.device):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _fp8_wo(layer: nn.Linear, device: torch.device):
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _w8a8_fp8(layer: nn.Linear, device: torch.device):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _int4_wo(layer: nn.Linear, device: torch.device):
    """GPU + bf16: torchao's tinygemm int4 layout; elsewhere: torchao's int4 weight-only path (codes kept in int8)."""
    group = _int4_group(layer)
    if group is None:
        return None
    if device.type == "cuda" and layer.weight.dtype == torch.bfloat16:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def _fp8_capable(device: torch.device) -> str | None:
    if device.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
        if cap >= (8, 9):
            return None
        return f"{torch.cuda.get_device_name(device)} is SM {cap[0]}.{cap[1]}"
    return f"device {device.type} has no fp8 matmul"


def _bnb_missing(device: torch.device) -> str | None:
    return None if importlib.util.find_spec("bitsandbytes") else "bitsandbytes is not installed"


@dataclass(frozen=True)
class Recipe:
    """One way to quantize the selected Linears.

    ``torchao``: a function (Linear, device) -> torchao config (None keeps that Linear).
    ``bnb``: "int8" or "nf4", the bitsandbytes module kind.
    ``unavailable``: (device) -> why this machine cannot run it, or None.
    """

    name: str
    summary: str
    library: str
    torchao: Callable[[nn.Linear, torch.device], object] | None = None
    bnb: str | None = None
    smoothquant: bool = False
    unavailable: Callable[[torch.device], str | None] | None = None

    def config_for(self, layer: nn.Linear, device: torch.device):
        return self.torchao(layer, device) if self.torchao else None


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("int8-wo", "int8 weights per output row, activations in the model dtype (torchao)", "torchao",
           torchao=_int8_wo),
    Recipe("w8a8-int8", "int8 weights + dynamic per-token int8 activations, SmoothQuant scales (torchao)",
           "torchao", torchao=_w8a8_int8, smoothquant=True),
    Recipe("fp8-wo", "fp8 e4m3 weights per output row, activations in the model dtype (torchao)", "torchao",
           torchao=_fp8_wo),
    Recipe("w8a8-fp8", "fp8 e4m3 weights + dynamic per-row fp8 activations (torchao; GPU SM >= 8.9)",
           "torchao", torchao=_w8a8_fp8, unavailable=_fp8_capable),
    Recipe("int4-wo", "int4 weights, groups of 128 (or 64/32) input channels (torchao)", "torchao",
           torchao=_int4_wo),
    Recipe("bnb-int8", "bitsandbytes LLM.int8 weights (Linear8bitLt, no outlier threshold)", "bitsandbytes",
           bnb="int8", unavailable=_bnb_missing),
    Recipe("bnb-nf4", "bitsandbytes NF4 weights, blocks of 64, double-quantized scales (Linear4bit)",
           "bitsandbytes", bnb="nf4", unavailable=_bnb_missing),
)}


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise UnsupportedError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def runnable_here(device: torch.device) -> list[str]:
    return [n for n, r in RECIPES.items() if r.unavailable is None or r.unavailable(device) is None]


def check_runnable(recipe: Recipe, device: torch.device) -> None:
    """Raise :class:`UnsupportedError` naming what does run here when ``recipe`` cannot run on ``device``."""
    why = recipe.unavailable(device) if recipe.unavailable else None
    if why:
        need = ("pip install bitsandbytes" if recipe.bnb else
                "it needs an NVIDIA GPU with fp8 (SM >= 8.9: L4, RTX 4090, H100)")
        raise UnsupportedError(f"recipe {recipe.name} cannot run here ({why}); {need}; recipes that run here: "
                               f"{', '.join(runnable_here(device))}")
