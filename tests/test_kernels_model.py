"""The kernel-path LM runner (gdn2q.kernels.bench) computes the same logits as the reference model."""

from __future__ import annotations

import torch

from gdn2q.config import GDN2Config
from gdn2q.kernels.bench import KernelLM, bench_model
from gdn2q.model.gdn2 import GDN2Mixer
from gdn2q.model.lm import GDN2ForCausalLM
from gdn2q.quant.state import StateQuantConfig


def _model() -> GDN2ForCausalLM:
    torch.manual_seed(0)
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=2, num_heads=1, num_v_heads=2, head_dim=32, vocab_size=97)
    model = GDN2ForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, GDN2Mixer):
            torch.nn.init.uniform_(m.A_log, 0.0, 1.0)
            torch.nn.init.uniform_(m.dt_bias, -3.0, 0.0)
    return model


def test_kernel_lm_prefill_then_decode_matches_model():
    model = _model()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    lm = KernelLM(model, batch=2, fmt=StateQuantConfig("fp32"))
    with torch.no_grad():
        ref = model(ids)
        got = lm.prefill(ids[:, :69])
        torch.testing.assert_close(got, ref[:, 68], rtol=1e-4, atol=1e-4)
        got = lm.decode(ids[:, 69])
        torch.testing.assert_close(got, ref[:, 69], rtol=1e-4, atol=1e-4)


def test_bench_model_reports_throughput_and_backend():
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=32, vocab_size=50)
    r = bench_model(cfg, batch=2, state="int8", recipe="fp8", prompt_len=16, decode_reps=2, device="cpu")
    assert r["backend"] in ("triton", "torch") and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["state"]["dtype"] == "int8" and r["recipe"] == "fp8"
