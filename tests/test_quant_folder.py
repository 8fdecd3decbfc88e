"""The quantized folder: self-describing, bit-identical on reload, atomic, and what inspect shows of it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gdn2q
from gdn2q.calib import calibrate_text
from gdn2q.cli import app
from gdn2q.cli.calibrate import bundled_text
from gdn2q.errors import OutputExistsError
from gdn2q.quant import folder as qfolder
from gdn2q.quant import quantize_model
from gdn2q.quant.folder import save_quantized_folder, summarize_quantized
from gdn2q.quant.state import StateQuantConfig

RECIPES = ["int8-wo", "w8a8-int8", "fp8-wo", "int4-wo", "bnb-int8", "bnb-nf4"]


@pytest.fixture(scope="module")
def calib():
    return calibrate_text(gdn2q.load_model(), bundled_text("calib.txt"), seq_len=64, max_tokens=256)


@pytest.mark.parametrize("recipe, dtype", [(r, torch.float32) for r in RECIPES] +
                         [("int8-wo", torch.bfloat16), ("bnb-nf4", torch.bfloat16)])
def test_reload_is_bit_identical(tmp_path, calib, recipe, dtype):
    ids = torch.randint(0, 4096, (2, 37), generator=torch.Generator().manual_seed(11))
    model = quantize_model(gdn2q.load_model(dtype=dtype), recipe, calib=calib, gates="quantize")
    with torch.no_grad():
        before = model(ids)
    save_quantized_folder(model, tmp_path / "q")
    reloaded = gdn2q.load_model(tmp_path / "q")
    with torch.no_grad():
        after = reloaded(ids)
    assert torch.equal(before, after)
    assert after.dtype == dtype
    section = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert section["recipe"] == recipe and section["library_versions"]["torchao"]
    assert len(section["source"]["sha256"]) == 64 and section["state"]["dtype"] == "fp32"
    assert (tmp_path / "q" / "tokenizer.json").is_file()


def test_state_format_and_scales_survive_reload(tmp_path, calib):
    fmt = StateQuantConfig("int8", scales="static", rounding="error-feedback")
    model = quantize_model(gdn2q.load_model(), "int8-wo", calib=calib, state_format=fmt)
    save_quantized_folder(model, tmp_path / "q")
    back = gdn2q.load_model(tmp_path / "q")
    assert back.state_format == fmt
    assert set(back.state_scales) == set(model.state_scales)
    for i, s in model.state_scales.items():
        assert torch.equal(back.state_scales[i], s)


def test_refuses_existing_output_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    model = quantize_model(gdn2q.load_model(), "int8-wo")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        save_quantized_folder(model, tmp_path / "taken")

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qfolder, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized_folder(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_summary_bytes_before_and_after(tmp_path):
    save_quantized_folder(quantize_model(gdn2q.load_model(dtype=torch.bfloat16), "bnb-nf4"), tmp_path / "q")
    info = summarize_quantized(tmp_path / "q")
    g = info["groups"]
    assert g["mlp"]["bytes_after"] < 0.35 * g["mlp"]["bytes"]          # 4-bit codes + block scales vs bf16
    assert g["embeddings"]["bytes_after"] == g["embeddings"]["bytes"]
    assert g["b_proj"]["bytes_after"] == g["b_proj"]["bytes"]          # gates kept by default
    assert info["bytes_after"] == sum(x["bytes_after"] for x in g.values()) < info["bytes"]
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "q")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "after" in result.output and "ratio" in result.output


def test_int4_codes_are_stored_two_per_byte(tmp_path):
    codes = torch.randint(-8, 8, (6, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(qfolder.unpack_int4(qfolder.pack_int4(codes)), codes)
    for recipe in ("int8-wo", "int4-wo"):
        save_quantized_folder(quantize_model(gdn2q.load_model(), recipe), tmp_path / recipe)
    int8, int4 = (summarize_quantized(tmp_path / r)["groups"]["mlp"]["bytes_after"] for r in ("int8-wo", "int4-wo"))
    assert int4 < 0.6 * int8


def test_tiny_fixture_main_job(tmp_path, checkpoint):
    """The pure GDN-2 `tiny` fixture (fp32): calibrate, w8a8-int8 with SmoothQuant, reload, compare."""
    from gdn2q.eval.compare import compare_models, default_base, eval_ids

    tiny = checkpoint("tiny")
    cal = calibrate_text(gdn2q.load_model(tiny), bundled_text("calib.txt"), seq_len=64, max_tokens=256)
    model = quantize_model(gdn2q.load_model(tiny), "w8a8-int8", calib=cal)
    assert model.quantization["smoothquant"]["folded_into"]
    save_quantized_folder(model, tmp_path / "q")
    ids = torch.randint(0, 4096, (1, 50), generator=torch.Generator().manual_seed(3))
    reloaded = gdn2q.load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
    base = default_base(reloaded)
    r = compare_models(base, reloaded, eval_ids(base, bundled_text("eval.txt"), 64, 128), seq_len=64)
    assert 0 < r["kl_mean"] < 5e-3 and r["top1_agreement"] > 0.9
