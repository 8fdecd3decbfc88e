"""compare: the metrics against hand computation, and the quantized model against its reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gdn2q
from gdn2q.eval.compare import compare_many, compare_models, window_logits
from gdn2q.eval.metrics import AgreementMeter, token_stats
from gdn2q.eval.report import report_markdown, write_report
from gdn2q.quant import quantize_model
from gdn2q.quant.state import StateQuantConfig

TOP_KEYS = {"base", "candidate", "kl_mean", "kl_p999", "top1_agreement", "tokens", "by_position"}


@pytest.fixture(scope="module")
def reference():
    return gdn2q.load_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 4096, (3 * 64,), generator=torch.Generator().manual_seed(5))


def test_token_stats_by_hand():
    base = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    cand = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 1.0, 0.5]]])
    targets = torch.tensor([[0, 1]])
    s = token_stats(base, cand, targets)
    p = base.softmax(-1)
    kl = (p * (p.log() - cand.log_softmax(-1))).sum(-1)
    assert torch.allclose(s["kl"], kl)
    assert torch.allclose(s["base_nll"], -base.log_softmax(-1)[0, [0, 1], [0, 1]])
    assert s["agree"].tolist() == [[0.0, 1.0]]
    meter = AgreementMeter(bucket=1)
    meter.add(s)
    r = meter.result()
    assert r["tokens"] == 2 and r["top1_agreement"] == 0.5
    assert math.isclose(r["base"]["ppl"], math.exp(s["base_nll"].double().mean().item()), rel_tol=1e-6)
    assert [b["top1_agreement"] for b in r["by_position"]] == [0.0, 1.0]
    assert r["kl_p999"] <= kl.max().item() + 1e-6 and r["kl_p999"] >= r["kl_mean"]


def test_model_against_itself(reference, ids):
    r = compare_models(reference, reference, ids, seq_len=64, batch_size=2)
    assert TOP_KEYS <= set(r)
    assert r["kl_mean"] == 0 and r["kl_p999"] == 0 and r["top1_agreement"] == 1.0
    assert r["base"]["ppl"] == r["candidate"]["ppl"] and r["tokens"] == 3 * 63
    assert [(b["start"], b["end"]) for b in r["by_position"]][:2] == [(0, 8), (8, 16)]


def test_quantized_candidate_and_many(reference, ids):
    int8 = quantize_model(gdn2q.load_model(), "int8-wo")
    nf4 = quantize_model(gdn2q.load_model(), "bnb-nf4")
    r = compare_many(reference, {"int8": int8, "nf4": nf4}, ids, seq_len=64, batch_size=3)
    assert 0 < r["int8"]["kl_mean"] < r["nf4"]["kl_mean"]
    assert r["int8"]["top1_agreement"] > 0.9 and abs(r["int8"]["ppl_increase"]) < 0.02
    assert r["int8"]["base"]["ppl"] == r["nf4"]["base"]["ppl"]
    md = report_markdown(r)
    assert "| int8 |" in md and "by position" in md


def test_quantized_state_is_compared_through_the_decode_path(reference, ids):
    int8_state = gdn2q.load_model()
    int8_state.state_format = StateQuantConfig("int8")
    batch = ids[:64].view(2, 32)
    assert torch.equal(window_logits(reference, batch), reference(batch))
    streamed = window_logits(int8_state, batch, stream=8)
    assert not torch.equal(streamed, reference(batch))
    r = compare_models(reference, int8_state, ids[:64], seq_len=32)      # token by token (stream default 1)
    assert 0 < r["kl_mean"] < 0.05


def test_report_files(tmp_path, reference, ids):
    r = compare_models(reference, reference, ids[:128], seq_len=64)
    write_report({"same": r}, tmp_path / "rep")
    assert (tmp_path / "rep" / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert TOP_KEYS <= set(json.loads((tmp_path / "rep" / "compare.json").read_text())["same"])
    assert "| same |" in (tmp_path / "rep" / "report.md").read_text()
