"""The kernel-path LM runner (gdn2q.kernels.bench) computes the same logits as the reference model."""

from __future__ import annotations

import copy

import pytest
import torch

from gdn2q.config import GDN2Config
from gdn2q.kernels import Fp8Linear, glue
from gdn2q.kernels.bench import KernelLM, bench_model
from gdn2q.model.gdn2 import GDN2Mixer
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.quant.state import StateQuantConfig

FP8_PROJ = ("q_proj", "k_proj", "v_proj", "b_proj", "w_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(**overrides) -> GDN2ForCausalLM:
    torch.manual_seed(0)
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=2, num_heads=1, num_v_heads=2, head_dim=32, vocab_size=97,
                     **overrides)
    model = GDN2ForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, GDN2Mixer):
            torch.nn.init.uniform_(m.A_log, 0.0, 1.0)
            torch.nn.init.uniform_(m.dt_bias, -3.0, 0.0)
            for conv in (m.q_conv1d, m.k_conv1d, m.v_conv1d):
                if conv.bias is not None:
                    torch.nn.init.normal_(conv.bias, std=0.1)
    return model


def _fp8_reference(model: GDN2ForCausalLM) -> GDN2ForCausalLM:
    """The model with the projections KernelLM runs in fp8 swapped for Fp8Linear modules."""
    ref = copy.deepcopy(model)
    for mod in list(ref.modules()):
        for name, child in list(mod.named_children()):
            if name in FP8_PROJ and isinstance(child, torch.nn.Linear):
                setattr(mod, name, Fp8Linear(child))
        if isinstance(mod, GDN2Mixer):
            mod.f_proj[0], mod.g_proj[0] = Fp8Linear(mod.f_proj[0]), Fp8Linear(mod.g_proj[0])
    return ref


@pytest.mark.parametrize(("recipe", "overrides"), [
    ("bf16", {}),
    ("fp8", {"conv_bias": True, "allow_neg_eigval": True, "output_gate_activation": "swish"}),
])
def test_kernel_lm_prefill_then_decode_matches_model(recipe: str, overrides: dict, monkeypatch):
    """The fused projections, conv windows, glue kernels and (fp8) per-token activation codes of the kernel
    path compute the model's logits, across the prefill -> decode hand-over."""
    model = _model(**overrides)
    ref_model = _fp8_reference(model) if recipe == "fp8" else model
    ids = torch.randint(0, 97, (2, 26), generator=torch.Generator().manual_seed(1))
    lm = KernelLM(model, batch=2, fmt=StateQuantConfig("fp32"), recipe=recipe)
    with torch.no_grad():
        with monkeypatch.context() as mp:   # the oracle quantizes its fp8 activations in PyTorch
            mp.setattr(glue, "use_triton", lambda x: False)
            ref = ref_model(ids)
        got = lm.prefill(ids[:, :24])
        torch.testing.assert_close(got, ref[:, 23], rtol=1e-4, atol=1e-4)
        for t in (24, 25):
            got = lm.decode(ids[:, t])
            torch.testing.assert_close(got, ref[:, t], rtol=1e-4, atol=1e-4)


def test_bench_model_reports_throughput_and_backend():
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=32, vocab_size=50)
    r = bench_model(cfg, batch=2, state="int8", recipe="fp8", prompt_len=16, decode_reps=2, device="cpu")
    assert r["backend"] in ("triton", "torch") and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["decode_kernel"] == ("triton" if r["backend"] == "triton" else "torch")   # the interpreter: no Gluon
    assert r["state"]["dtype"] == "int8" and r["recipe"] == "fp8"
    assert r["device"] == "cpu" and r["card"]          # the processor's name, for the JSON a run leaves behind
