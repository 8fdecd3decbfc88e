"""The exported ONNX graph against the PyTorch model, on fresh random token streams."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import gdn2q
from gdn2q.errors import UnsupportedError
from gdn2q.export.exporter import export_onnx
from gdn2q.export.graph import ModelGraph, dense_weights, onnx_state_format
from gdn2q.export.runner import OnnxGDN2Runner
from gdn2q.quant.state import StateQuantConfig
from tests.conftest import shared_path

STEPS = 70          # past tiny-hybrid's attention window (64): the ring buffer and its mask are exercised


def _random_ids(vocab: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name, state, prefill) -> (torch model, runner), exported once per module."""
    cache = {}

    def get(name: str, state: str = "fp32", prefill: str = "graph"):
        key = (name, state, prefill)
        if key not in cache:
            path = None if name == "bundled" else shared_path("checkpoints", name)
            lm = gdn2q.load_model(path)
            out = tmp_path_factory.mktemp("-".join(key)) / "onnx"
            export_onnx(lm, out, state=state, prefill=prefill)
            cache[key] = (lm, OnnxGDN2Runner(out, threads=1))
        return cache[key]

    return get


@pytest.mark.parametrize("name,prefill", [("tiny", "graph"), ("tiny-hybrid", "graph"), ("bundled", "graph"),
                                          ("tiny-hybrid", "step")])
def test_fp32_graph_matches_pytorch_forward(exported, name, prefill):
    lm, runner = exported(name, prefill=prefill)
    ids = _random_ids(lm.config.vocab_size, (2, STEPS), seed=len(name))
    with torch.no_grad():
        ref = lm(ids).numpy()                      # one full forward (chunk/serial form) is the reference
    got, state = runner.prefill(ids.numpy(), return_all=True)
    assert got.shape == ref.shape
    diff = np.abs(got - ref).max()
    assert diff <= 1e-4, f"{name}/{prefill}: max |logit diff| {diff}"
    assert (state.position == STEPS).all()


@pytest.mark.parametrize("name,state", [("tiny-hybrid", "fp32"), ("tiny-hybrid", "int8"), ("tiny", "int8")])
def test_prompt_chunks_then_decode_steps_match_pytorch(exported, name, state):
    """Prefill in two calls (the second crosses the attention window), then single-token steps, like PyTorch."""
    lm, runner = exported(name, state)
    ids = _random_ids(lm.config.vocab_size, (2, 40 + 30 + 5), seed=9)
    st = lm.new_state(2, fmt=StateQuantConfig(state))
    with torch.no_grad():
        ref = [lm(ids[:, :40], st), lm(ids[:, 40:70], st)] + [lm(ids[:, t:t + 1], st) for t in range(70, 75)]
    ref = torch.cat(ref, 1).numpy()
    a, ost = runner.prefill(ids[:, :40].numpy(), return_all=True)
    b, ost = runner.prefill(ids[:, 40:70].numpy(), ost, return_all=True)
    steps = [runner.step(ids[:, t].numpy(), ost)[:, None] for t in range(70, 75)]
    got = np.concatenate([a, b] + steps, axis=1)
    # int8 state: a rounding tie can flip one code between the two implementations, so allow a little more
    assert np.abs(got - ref).max() <= (1e-4 if state == "fp32" else 2e-2)


def test_state_layout_is_the_pytorch_decode_state(exported):
    """conv_state = the q, k, v windows concatenated; recurrent_state = S[k, v]; attention key/value windows."""
    lm, runner = exported("tiny-hybrid")
    ids = _random_ids(lm.config.vocab_size, (1, 9), seed=3)
    st = lm.new_state(1)
    with torch.no_grad():
        lm(ids, st)
    _, ost = runner.prefill(ids.numpy())
    for i, layer in enumerate(st.layers):
        if lm.config.is_attention_layer(i):
            n = layer.key.shape[2]                 # the PyTorch window holds the 9 tokens seen so far
            np.testing.assert_allclose(ost.tensors[f"past_key_values.{i}.key"][:, :, -n:], layer.key.numpy(),
                                       atol=1e-5)
            assert not ost.tensors[f"past_key_values.{i}.key"][:, :, :-n].any()   # unused slots stay zero
        else:
            np.testing.assert_allclose(ost.tensors[f"past_key_values.{i}.recurrent_state"], layer.load().numpy(),
                                       atol=1e-5)
            conv = torch.cat(list(layer.conv), dim=1).numpy()
            np.testing.assert_allclose(ost.tensors[f"past_key_values.{i}.conv_state"], conv, atol=1e-5)


@pytest.mark.parametrize("prefill", ["graph", "step"])
def test_dynamic_batch_with_rows_at_different_positions(exported, prefill):
    """Rows of one batch can be at different positions (each row has its own window mask and RoPE angle)."""
    lm, runner = exported("tiny-hybrid", prefill=prefill)
    a = _random_ids(lm.config.vocab_size, (1, 12), seed=5)
    b = _random_ids(lm.config.vocab_size, (1, 5), seed=6)
    with torch.no_grad():
        ref_a, ref_b = lm(a)[0, -1].numpy(), lm(b)[0, -1].numpy()
    _, sa = runner.prefill(a.numpy()[:, :7])                    # row a is 7 tokens ahead of row b
    joint = runner.new_state(2)
    joint.tensors = {k: np.concatenate([sa.tensors[k], runner.new_state(1).tensors[k]]) for k in sa.tensors}
    joint.position = np.array([7, 0])
    for t in range(5):
        logits = runner.step(np.array([a[0, 7 + t], b[0, t]]), joint)
    np.testing.assert_allclose(logits[0], ref_a, atol=1e-4)
    np.testing.assert_allclose(logits[1], ref_b, atol=1e-4)


def test_int8_state_steps_match_pytorch_int8_state(exported):
    """int8 codes + per-row fp32 scales in and out of every step, as gdn2q/quant/state.py stores them."""
    lm, runner = exported("tiny", "int8")
    names = {t.input_name: t.dtype for t in runner.spec.state_tensors}
    assert names["past_key_values.0.recurrent_state"] == "int8"
    assert names["past_key_values.0.recurrent_state_scale"] == "float32"
    ids = _random_ids(lm.config.vocab_size, (1, 48), seed=7)
    st = lm.new_state(1, fmt=StateQuantConfig("int8"))
    ost = runner.new_state(1)
    with torch.no_grad():
        ref = torch.cat([lm(ids[:, t:t + 1], st) for t in range(ids.shape[1])], 1)[0].numpy()
    got = np.stack([runner.step(ids[:, t].numpy(), ost)[0] for t in range(ids.shape[1])])
    q = st.layers[0].recurrent
    codes = ost.tensors["past_key_values.0.recurrent_state"]
    assert codes.dtype == np.int8
    # rounding ties can flip single codes by one step; the stored values must still agree closely
    np.testing.assert_allclose(ost.tensors["past_key_values.0.recurrent_state_scale"], q.scales.numpy(), rtol=1e-3)
    assert np.mean(codes == q.codes.numpy()) > 0.99
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.97
    assert np.abs(got - ref).max() < 0.1


@pytest.mark.parametrize("state", ["fp32", "int8"])
@pytest.mark.parametrize("prefill", ["graph", "step"])
def test_graph_uses_standard_onnx_ops_only(exported, state, prefill):
    lm, _ = exported("tiny-hybrid")
    model, _ = ModelGraph(lm.config, dense_weights(lm), state, prefill).build()
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert ("Scan" in ops) == (prefill == "graph")


@pytest.mark.parametrize("fmt,feature", [
    (StateQuantConfig("fp8"), "fp8"), (StateQuantConfig("int8", rounding="error-feedback"), "error-feedback"),
    (StateQuantConfig("int8", granularity="head"), "head"), (StateQuantConfig("bf16"), "bf16"),
    (StateQuantConfig("int8", conv="int8"), "conv-window state format int8")])
def test_state_formats_the_graph_cannot_express_are_named(fmt, feature):
    with pytest.raises(UnsupportedError, match=feature):
        onnx_state_format(fmt)


def test_attention_without_window_keeps_a_growing_cache(tmp_path):
    """Full causal attention layers (window_size None): the key/value cache grows by T per call."""
    import dataclasses

    lm = gdn2q.load_model()
    attn = dataclasses.replace(lm.config.attn, window_size=None)
    lm.config = lm.config.replace(attn=attn)
    for block in lm.model.layers:
        if hasattr(block.attn, "cfg"):
            block.attn.cfg = attn
    export_onnx(lm, tmp_path / "onnx")
    runner = OnnxGDN2Runner(tmp_path / "onnx")
    ids = _random_ids(lm.config.vocab_size, (2, 80), seed=4)
    with torch.no_grad():
        ref = lm(ids).numpy()
    a, state = runner.prefill(ids[:, :70].numpy(), return_all=True)
    steps = [runner.step(ids[:, t].numpy(), state)[:, None] for t in range(70, 80)]
    assert state.tensors["past_key_values.1.key"].shape[2] == 80
    assert np.abs(np.concatenate([a] + steps, axis=1) - ref).max() <= 1e-4
