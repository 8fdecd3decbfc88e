"""Recipes and the precision policy, each quantized model checked against the unquantized reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gdn2q
from gdn2q.calib import calibrate_text
from gdn2q.cli.calibrate import bundled_text
from gdn2q.errors import ConfigError, DataError, UnsupportedError
from gdn2q.quant import quantize_model
from gdn2q.quant.recipes import RECIPES, runnable_here
from gdn2q.quant.state import StateQuantConfig

CPU_RECIPES = ["int8-wo", "w8a8-int8", "fp8-wo", "int4-wo", "bnb-int8", "bnb-nf4"]
# mean KL(reference || quantized) bound on random tokens: 8-bit formats stay far below, 4-bit a bit above 1e-2
KL_BOUND = {"int8-wo": 2e-3, "w8a8-int8": 2e-3, "fp8-wo": 5e-3, "int4-wo": 5e-2, "bnb-int8": 2e-3, "bnb-nf4": 5e-2}


@pytest.fixture(scope="module")
def reference():
    return gdn2q.load_model()


@pytest.fixture(scope="module")
def calib(reference):
    return calibrate_text(reference, bundled_text("calib.txt"), seq_len=64, max_tokens=512, batch_size=4)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def linear_weight_types(model: nn.Module) -> dict[str, str]:
    return {n: type(m.weight).__name__ for n, m in model.named_modules() if hasattr(m, "weight")
            and n.endswith(("_proj", "proj.0", "proj.1", "lm_head"))}


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_recipe_close_to_reference_on_fresh_inputs(reference, calib, recipe):
    ids = torch.randint(0, reference.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))
    model = quantize_model(gdn2q.load_model(), recipe, calib=calib)
    with torch.no_grad():
        ref, out = reference(ids), model(ids)
    kl = mean_kl(ref, out)
    assert 0 < kl < KL_BOUND[recipe]
    types = linear_weight_types(model)
    assert types["lm_head"] == "Parameter" and types["model.layers.0.attn.b_proj"] == "Parameter"
    assert types["model.layers.0.attn.q_proj"] != "Parameter"
    assert type(model.model.layers[0].attn.A_log).__name__ == "Parameter"
    assert model.quantization["recipe"] == recipe
    assert "model.layers.0.mlp.down_proj" in model.quantization["policy"]["quantized"]


def test_gates_and_keep_policy(reference):
    model = quantize_model(gdn2q.load_model(), "int8-wo", gates="quantize", keep=(r"layers\.2\.mlp\.",))
    types = linear_weight_types(model)
    assert types["model.layers.0.attn.b_proj"] == "Int8Tensor"
    assert types["model.layers.0.attn.f_proj.1"] == "Int8Tensor"
    assert types["model.layers.2.mlp.up_proj"] == "Parameter"
    assert types["model.layers.1.mlp.up_proj"] == "Int8Tensor"
    kept = model.quantization["policy"]["kept"]
    assert kept["model.layers.2.mlp.up_proj"].startswith("--keep") and kept["lm_head"].startswith("lm_head")


def test_unknown_recipe_lists_known():
    with pytest.raises(UnsupportedError, match="known recipes: int8-wo, w8a8-int8"):
        quantize_model(gdn2q.load_model(), "int3-magic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without fp8")
def test_fp8_activations_need_fp8_hardware():
    with pytest.raises(UnsupportedError, match="recipes that run here: int8-wo") as e:
        quantize_model(gdn2q.load_model(), "w8a8-fp8")
    assert "SM >= 8.9" in str(e.value)
    assert "w8a8-fp8" not in runnable_here(torch.device("cpu")) and set(CPU_RECIPES) <= set(RECIPES)


def test_smoothquant_needs_calibration():
    with pytest.raises(DataError, match="--calib"):
        quantize_model(gdn2q.load_model(), "w8a8-int8")
    model = quantize_model(gdn2q.load_model(), "w8a8-int8", smoothquant_alpha=None)
    assert model.quantization["smoothquant"] is None


def test_bad_policy_options():
    with pytest.raises(ConfigError, match="gates"):
        quantize_model(gdn2q.load_model(), "int8-wo", gates="maybe")
    with pytest.raises(ConfigError, match="regular expression"):
        quantize_model(gdn2q.load_model(), "int8-wo", keep=("(",))


def test_static_state_scales_from_calibration(calib):
    fmt = StateQuantConfig("int8", scales="static")
    model = quantize_model(gdn2q.load_model(), "int8-wo", calib=calib, state_format=fmt)
    assert model.state_format == fmt
    for i, absmax in calib.state_absmax().items():
        assert torch.allclose(model.state_scales[i] * 127.0, absmax)
    assert model.quantization["state"]["dtype"] == "int8"
