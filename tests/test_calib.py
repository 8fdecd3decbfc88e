"""Calibration: what the statistics are, that they are reproducible, and what bad input gets."""

from __future__ import annotations

import shutil

import pytest
import torch

import gdn2q
from gdn2q.calib import calibrate, calibrate_text, load_calibration
from gdn2q.calib.observers import ChannelRangeObserver
from gdn2q.cli.calibrate import bundled_text
from gdn2q.errors import DataError

SEQ = 128


@pytest.fixture(scope="module")
def model():
    return gdn2q.load_model()


def test_keys_shapes_and_linear_ranges(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2 * SEQ,), generator=gen)
    calib = calibrate(model, ids, seq_len=SEQ, batch_size=2, clip=("absmax", "percentile", "mse"))
    cfg = model.config
    # an independent recomputation: q_proj of layer 0 reads attn_norm(embeddings(ids))
    with torch.no_grad():
        x = model.model.layers[0].attn_norm(model.model.embeddings(ids.view(2, SEQ)))
    assert torch.equal(calib.tensors["linear.model.layers.0.attn.q_proj.absmax"], x.abs().amax((0, 1)))
    pct = calib.tensors["linear.model.layers.0.attn.q_proj.percentile"]
    mse = calib.tensors["linear.model.layers.0.attn.q_proj.mse"]
    absmax = calib.tensors["linear.model.layers.0.attn.q_proj.absmax"]
    assert (pct <= absmax + 1e-6).all() and (mse <= absmax + 1e-6).all() and (mse > 0).all()
    for i in cfg.gdn2_layers:
        assert calib.tensors[f"state.{i}.absmax"].shape == (cfg.value_heads, cfg.head_dim)
        assert calib.tensors[f"gate.{i}.b.max"].shape == (cfg.num_heads, cfg.head_dim)
        assert calib.tensors[f"gate.{i}.w.mean"].shape == (cfg.value_heads, cfg.head_v_dim)
        b_lo, b_hi = calib.tensors[f"gate.{i}.b.min"], calib.tensors[f"gate.{i}.b.max"]
        assert (b_lo >= 0).all() and (b_hi <= 1).all() and (b_lo <= b_hi).all()
        assert (calib.tensors[f"gate.{i}.g.max"] <= 0).all()            # log decay
    for i in cfg.attn.layers:
        assert f"state.{i}.absmax" not in calib.tensors


def test_state_absmax_is_the_largest_state_seen(model):
    """One window, so the last read is the final state of a full forward with an explicit state."""
    ids = torch.randint(0, model.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(2))
    calib = calibrate(model, ids, seq_len=SEQ, batch_size=1)
    state = model.new_state(1)
    with torch.no_grad():
        model(ids.view(1, SEQ), state)
    for i in model.config.gdn2_layers:
        final = state.layers[i].load().abs().amax(dim=(0, 3))
        got = calib.tensors[f"state.{i}.absmax"]
        assert (got >= final - 1e-5).all()
        assert got.max() > 0


def test_same_model_and_text_same_bytes(model, tmp_path):
    a = calibrate_text(model, bundled_text("calib.txt"), seq_len=64, max_tokens=256, batch_size=2)
    b = calibrate_text(model, bundled_text("calib.txt"), seq_len=64, max_tokens=256, batch_size=2)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_calibration(tmp_path / "a.safetensors")
    assert back.meta["model_name"] == "tiny-hybrid" and back.meta["tokens"] == "256"
    back.check_for(model)


def test_observer_sample_is_deterministic_and_bounded():
    obs = ChannelRangeObserver(3, max_rows=10, stride=3)
    for _ in range(5):
        obs.update(torch.arange(24, dtype=torch.float32).view(8, 3))
    assert obs.sample().shape == (10, 3)
    assert torch.equal(obs.absmax, torch.tensor([21.0, 22.0, 23.0]))


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"\x00\x01binary\x00", "binary"), (b"ROMEO: hi\n", "only")])
def test_bad_calibration_text(model, tmp_path, content, message):
    p = tmp_path / "text.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        calibrate_text(model, p, seq_len=SEQ)


def test_calibration_of_another_model_is_refused(model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(gdn2q.checkpoint.bundled_model_path(), other)
    from safetensors.torch import load_file, save_file

    sd = load_file(other / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    calib = calibrate_text(gdn2q.load_model(other), bundled_text("calib.txt"), seq_len=64, max_tokens=64)
    calib.save(tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="made for model other"):
        load_calibration(tmp_path / "other.safetensors").check_for(model)


def test_not_a_calibration_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(DataError, match="not a gdn2q calibration file"):
        load_calibration(tmp_path / "x.safetensors")
