"""Exported folders: contents, weight formats, the torch-free runner and verify against PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gdn2q
from gdn2q.data import load_tokenizer, tokenize_file
from gdn2q.errors import OutputExistsError, UnsupportedError
from gdn2q.export.exporter import export_onnx
from gdn2q.export.runner import OnnxGDN2Runner
from gdn2q.export.spec import MODEL_FILE, SPEC_FILE, TOKENIZER_FILE
from gdn2q.export.verify import verify_export


def test_runner_imports_without_torch():
    code = "import sys, gdn2q.export.runner; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid", "small"])
def test_fp32_export_verifies_over_64_decode_steps(checkpoint, tmp_path, name):
    lm = gdn2q.load_model(checkpoint(name))
    export_onnx(lm, tmp_path / "onnx")
    prompt = torch.randint(0, lm.config.vocab_size, (6,), generator=torch.Generator().manual_seed(11)).tolist()
    report = verify_export(OnnxGDN2Runner(tmp_path / "onnx"), lm, prompt, steps=64)
    assert report.max_abs_diff <= 1e-4, report.summary()
    assert report.greedy_equal and report.onnx_tokens == report.torch_tokens
    assert report.passed


def test_folder_is_self_describing(tmp_path):
    lm = gdn2q.load_model()
    res = export_onnx(lm, tmp_path / "onnx", weights="int8", state="int8")
    folder = tmp_path / "onnx"
    assert {p.name for p in folder.iterdir()} == {MODEL_FILE, SPEC_FILE, TOKENIZER_FILE}
    spec = json.loads((folder / SPEC_FILE).read_text())
    assert spec["weights"] == "int8" and spec["state"] == "int8"
    assert spec["inputs"][:2] == ["input_ids", "position_ids"]
    assert "past_key_values.0.recurrent_state" in spec["inputs"] and "present.1.key" in spec["outputs"]
    assert res.onnx_bytes == (folder / MODEL_FILE).stat().st_size
    with pytest.raises(OutputExistsError):
        export_onnx(lm, folder)
    export_onnx(lm, folder, force=True)
    assert json.loads((folder / SPEC_FILE).read_text())["weights"] == "fp32"


@pytest.mark.parametrize("weights,min_top1", [("fp16", 0.99), ("int8", 0.95), ("int4", 0.8)])
def test_quantized_exports_against_pytorch(checkpoint, tmp_path, weights, min_top1):
    lm = gdn2q.load_model(checkpoint("tiny"))
    res = export_onnx(lm, tmp_path / "onnx", weights=weights, state="int8")
    fp32 = export_onnx(lm, tmp_path / "ref", weights="fp32")
    assert res.onnx_bytes < fp32.onnx_bytes * {"fp16": 0.55, "int8": 0.35, "int4": 0.25}[weights]
    prompt = torch.randint(0, lm.config.vocab_size, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    report = verify_export(OnnxGDN2Runner(tmp_path / "onnx"), lm, prompt, steps=32)
    assert report.top1_agreement >= min_top1, report.summary()
    assert report.passed


def test_int8_weights_and_state_agree_with_fp32_pytorch_on_small(checkpoint, corpus, tmp_path):
    """Done-when: top-1 agreement >= 0.98 with PyTorch fp32 over 512 tokens of shakespeare_eval."""
    lm = gdn2q.load_model(checkpoint("small"))
    export_onnx(lm, tmp_path / "onnx", weights="int8", state="int8")
    ids = tokenize_file(load_tokenizer(lm.tokenizer_path), corpus("shakespeare_eval.txt"), 512, 512)[:512]
    ids = torch.as_tensor(ids).view(1, -1)
    with torch.no_grad():
        ref = lm(ids)[0].numpy()
    runner = OnnxGDN2Runner(tmp_path / "onnx")
    state = runner.new_state(1)      # one token per call: the int8 state is re-quantized after every token
    got = np.stack([runner.step(ids[:, t].numpy(), state)[0] for t in range(ids.shape[1])])
    agreement = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agreement >= 0.98, agreement


def test_export_refuses_what_the_graph_cannot_express(tmp_path):
    lm = gdn2q.load_model()
    with pytest.raises(UnsupportedError, match="--state fp8"):
        export_onnx(lm, tmp_path / "a", state="fp8")
    with pytest.raises(UnsupportedError, match="--weights int3"):
        export_onnx(lm, tmp_path / "b", weights="int3")
    with pytest.raises(UnsupportedError, match="block-size"):
        export_onnx(lm, tmp_path / "c", weights="int4", block_size=24)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_runner_sampling_is_seeded_and_greedy_is_deterministic(tmp_path):
    lm = gdn2q.load_model()
    export_onnx(lm, tmp_path / "onnx")
    r = OnnxGDN2Runner(tmp_path / "onnx")
    ids = r.tokenizer.encode("ROMEO:").ids
    assert r.generate(ids, 12, temperature=0.8, top_k=20, seed=1) == r.generate(ids, 12, temperature=0.8, top_k=20,
                                                                                 seed=1)
    with torch.no_grad():
        ref = lm.generate(torch.tensor([ids]), 12)[0].tolist()
    assert r.generate(ids, 12) == ref


@pytest.mark.parametrize("recipe", ["int8-wo", "bnb-nf4"])
def test_quantized_pytorch_models_export_their_dequantized_weights(tmp_path, recipe):
    """torchao / bitsandbytes models export as the function they compute (checked against the fp32 copy with
    their dequantized weights), and the quantized model itself agrees on the greedy text."""
    from gdn2q.export.verify import fp32_reference
    from gdn2q.quant import quantize_model

    lm = quantize_model(gdn2q.load_model(), recipe)
    export_onnx(lm, tmp_path / "onnx")
    runner = OnnxGDN2Runner(tmp_path / "onnx")
    report = verify_export(runner, fp32_reference(lm), [5, 6, 7, 8], steps=8)
    assert report.passed and report.max_abs_diff <= 1e-4, report.summary()
    assert verify_export(runner, lm, [5, 6, 7, 8], steps=8).top1_agreement >= 0.9


def test_weights_go_to_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    """Models past 2 GB keep their weights in model.onnx.data; simulated by lowering the threshold."""
    import gdn2q.export.exporter as exporter

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_ABOVE", 0)
    lm = gdn2q.load_model()
    res = export_onnx(lm, tmp_path / "onnx")
    data = tmp_path / "onnx" / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (tmp_path / "onnx" / MODEL_FILE).stat().st_size
    assert res.onnx_bytes == data.stat().st_size + (tmp_path / "onnx" / MODEL_FILE).stat().st_size
    report = verify_export(OnnxGDN2Runner(tmp_path / "onnx"), lm, [3, 1, 4, 1, 5], steps=8)
    assert report.passed, report.summary()
