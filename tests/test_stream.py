"""Long-stream evaluation of state formats (gdn2q.eval.stream) on the tiny fixtures."""

from __future__ import annotations

import copy

import pytest
import torch

import gdn2q
from gdn2q.eval.stream import StreamRun, grid_runs, stacked_state, state_bytes, stream_compare
from gdn2q.quant.state import StateQuantConfig
from tests.conftest import shared_path

COMPARE_KEYS = {"base", "candidate", "kl_mean", "kl_p999", "top1_agreement", "tokens", "ppl_increase",
                "by_position"}


@pytest.fixture(scope="module")
def tiny_hybrid():
    return gdn2q.load_model(shared_path("checkpoints", "tiny-hybrid"))


def test_grid_covers_every_dtype_and_rounding():
    labels = [r.name for r in grid_runs()]
    assert labels == ["fp32", "bf16", "int8/nearest", "int8/stochastic", "int8/error-feedback", "fp8/nearest",
                      "fp8/stochastic", "fp8/error-feedback"]


def test_stacked_rows_equal_separate_states(tiny_hybrid):
    """Rows stored in different formats in one batch give what each format gives alone."""
    fmts = [StateQuantConfig("int8", rounding="error-feedback"), StateQuantConfig("fp8")]
    ids = torch.randint(0, tiny_hybrid.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = tiny_hybrid(ids.expand(2, -1), stacked_state(tiny_hybrid, fmts))
        for row, fmt in enumerate(fmts):
            alone = tiny_hybrid(ids, stacked_state(tiny_hybrid, [fmt]))
            assert (both[row] - alone[0]).abs().max().item() < 0.05
            assert torch.equal(both[row].argmax(-1), alone[0].argmax(-1))


def test_stream_compare_keys_positions_and_ordering(tiny_hybrid, corpus):
    from gdn2q.data import load_tokenizer, tokenize_file

    ids = tokenize_file(load_tokenizer(tiny_hybrid.tokenizer_path), corpus("shakespeare_eval.txt"), max_tokens=601)
    runs = [StreamRun(f.label, f) for f in (StateQuantConfig(), StateQuantConfig("int8"),
                                             StateQuantConfig("int8", rounding="error-feedback"))]
    runs.append(StreamRun("int8-wo weights", StateQuantConfig(), copy.deepcopy(tiny_hybrid).requires_grad_(False)))
    r = stream_compare(tiny_hybrid, runs, ids, segment=128, bucket=256)
    for res in r.values():
        assert COMPARE_KEYS <= set(res)
        assert [(b["start"], b["end"]) for b in res["by_position"]] == [(0, 256), (256, 512), (512, 600)]
        assert res["tokens"] == 600 and res["stream_tokens"] == 601
    # fp32 state through the per-token path matches the chunked fp32 reference
    assert r["fp32"]["kl_mean"] < 1e-6 and r["fp32"]["top1_agreement"] == 1.0
    assert r["int8-wo weights"]["kl_mean"] < 1e-6        # same weights (a copy), other model object
    assert 0 < r["int8/error-feedback"]["kl_mean"] < r["int8/nearest"]["kl_mean"]
    assert r["int8/nearest"]["top1_agreement"] > 0.9
    assert r["int8/nearest"]["state_bytes_per_layer"] == state_bytes(tiny_hybrid.config, StateQuantConfig("int8"))


def test_state_bytes_of_small_layer(checkpoint):
    """small: 3 heads x 128 x 128. int8/fp8 with per-row scales ~0.26 of fp32 (recurrent part)."""
    cfg = gdn2q.GDN2Config.from_json(checkpoint("small") / "config.json")
    fp32 = state_bytes(cfg, StateQuantConfig())
    assert fp32["recurrent"] == 3 * 128 * 128 * 4
    assert fp32["conv"] == (3 * 384) * 4 * 4
    for dtype in ("int8", "fp8"):
        assert 0.25 < state_bytes(cfg, StateQuantConfig(dtype))["recurrent"] / fp32["recurrent"] < 0.27
    assert state_bytes(cfg, StateQuantConfig("int8", conv="int8"))["conv"] == 3 * 384 * 4 + 3 * 4 * 4
