"""Quantization: weight recipes (torchao, bitsandbytes), precision policy, recurrent-state formats.

``quantize_model`` and the recipe table load torchao/bitsandbytes lazily, so importing the model (which uses
:mod:`gdn2q.quant.state`) never pays for them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "Recipe", "quantize_model"]


def __getattr__(name: str) -> Any:
    if name == "quantize_model":
        from gdn2q.quant.apply import quantize_model

        return quantize_model
    if name in ("RECIPES", "Recipe"):
        from gdn2q.quant import recipes

        return getattr(recipes, name)
    raise AttributeError(name)
