"""The reference model reproduces the real trained checkpoints (fp64 oracle and fla's bf16 kernels)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import gdn2q
from tests.conftest import FIXTURES


def _run(path, dtype=torch.float32, mode="auto"):
    model = gdn2q.load_model(path, dtype=dtype)
    model.set_recurrence(mode)
    ref = load_file(str(path / "reference.safetensors"))
    with torch.no_grad():
        return model(ref["input_ids"]).float(), ref


@pytest.mark.parametrize("name", FIXTURES)
def test_fp32_matches_fp64_oracle_and_fla_kernels(checkpoint, name):
    logits, ref = _run(checkpoint(name))
    assert (logits - ref["logits_oracle_fp64"]).abs().max().item() < 1e-3
    top1 = (logits.argmax(-1) == ref["logits_fla_bf16"].argmax(-1)).float().mean().item()
    assert top1 >= 0.97
    assert (logits - ref["logits_fla_bf16"]).abs().max().item() < 0.5


@pytest.mark.parametrize("name", FIXTURES)
def test_bf16_path_agrees_with_fla_bf16(checkpoint, name):
    logits, ref = _run(checkpoint(name), dtype=torch.bfloat16)
    top1 = (logits.argmax(-1) == ref["logits_fla_bf16"].argmax(-1)).float().mean().item()
    assert top1 >= 0.97


@pytest.mark.parametrize("name", FIXTURES)
def test_chunked_and_serial_forms_agree_on_fixtures(checkpoint, name):
    serial, _ = _run(checkpoint(name), mode="serial")
    chunk, _ = _run(checkpoint(name), mode="chunk")
    assert (serial - chunk).abs().max().item() < 1e-4


def test_bundled_model_is_tiny_hybrid_and_matches_oracle(checkpoint):
    model = gdn2q.load_model()
    ref = load_file(str(checkpoint("tiny-hybrid") / "reference.safetensors"))
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert (logits - ref["logits_oracle_fp64"]).abs().max().item() < 1e-3
    assert model.tokenizer_path is not None and model.tokenizer_path.is_file()
