"""MQAR data, training loop and the recall evaluation of state formats (the shipped recall model)."""

from __future__ import annotations

import pytest
import torch

import gdn2q
from gdn2q.errors import ConfigError, DataError
from gdn2q.eval.recall import bundled_recall_model_path, recall_eval
from gdn2q.eval.stream import StreamRun
from gdn2q.quant.state import StateQuantConfig
from gdn2q.recall.data import IGNORE, MQARSpec, mqar_batch, query_start
from gdn2q.recall.train import TrainSettings, mqar_config, train_mqar


def test_mqar_layout():
    spec = MQARSpec(num_keys=20, num_values=20, num_noise=10)
    ids, labels = mqar_batch(spec, 3, 40, 5, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (3, 40)
    q0 = query_start(40, 5)
    for row in range(3):
        keys, values = ids[row, 0:10:2], ids[row, 1:10:2]
        assert len(set(keys.tolist())) == 5                                    # distinct keys
        assert ((keys >= spec.key_start) & (keys < spec.value_start)).all()
        assert ((values >= spec.value_start) & (values < spec.noise_start)).all()
        assert (ids[row, 10:q0] >= spec.noise_start).all()                     # noise only
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for p in range(q0, 40, 2):                                             # each query's answer follows it
            assert labels[row, p] == pairs[ids[row, p].item()] == ids[row, p + 1]
        assert (labels[row] != IGNORE).sum() == 5
    with pytest.raises(DataError, match="too short"):
        mqar_batch(spec, 1, 10, 5)


def test_training_loop_runs():
    spec = MQARSpec(num_keys=8, num_values=8, num_noise=4)
    cfg = mqar_config(spec, hidden_size=32, num_layers=1, num_heads=1, head_dim=16)
    settings = TrainSettings(length=16, stages=(1, 2), batch=8, max_steps=4, min_stage_steps=1, log_every=1,
                             advance_at=0.0, spec=spec)
    model, history = train_mqar(settings, cfg, log=lambda e: None)
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert [h["stage_max_pairs"] for h in history] == [1, 2, 2, 2]      # the curriculum moved on
    assert not model.training


@pytest.fixture(scope="module")
def recall_model():
    return gdn2q.load_model(bundled_recall_model_path())


def test_shipped_recall_model_and_int8_error_feedback(recall_model):
    """At the trained length: fp32 state >= 90%, int8 error feedback within 1 point of it (same sequences)."""
    info = recall_model.config.extra["mqar"]
    runs = [StreamRun(f.label, f) for f in (StateQuantConfig(), StateQuantConfig("int8", rounding="error-feedback"))]
    r = recall_eval(recall_model, runs, lengths=[info["trained_length"]], sequences=8)
    n = info["trained_length"]
    fp32, ef = r["runs"]["fp32"]["accuracy"][n], r["runs"]["int8/error-feedback"]["accuracy"][n]
    assert fp32 >= 0.9 and abs(r["full_forward_fp32"][n] - fp32) < 0.01
    assert ef >= fp32 - 0.01
    assert r["queries_per_length"] == 8 * info["num_pairs"]


def test_recall_refuses_a_model_without_the_task(checkpoint):
    with pytest.raises(ConfigError, match="not an MQAR recall model"):
        recall_eval(gdn2q.load_model(checkpoint("tiny")), [], lengths=[8])
