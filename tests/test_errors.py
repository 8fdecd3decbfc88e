"""Bad input: one line naming the file and the fix, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gdn2q.cli import app


class NotATensor:  # pickled by a .pth that needs unsafe unpickling
    pass


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_bad_input(result, *needles: str):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "Traceback" not in result.output
    for n in needles:
        assert n in err, err


@pytest.fixture
def folder(tmp_path, checkpoint) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(checkpoint("tiny"), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    (dst / "reference.safetensors").unlink()
    return dst


def edit_tensors(folder: Path, fn) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_missing_path(tmp_path):
    assert_bad_input(run("inspect", str(tmp_path / "nope")), "nope", "no such file")


def test_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert_bad_input(run("inspect", str(f)), "notes.txt", "not a checkpoint")
    assert_bad_input(run("inspect", str(tmp_path)), str(tmp_path), "config.json")


def test_truncated_safetensors(folder):
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert_bad_input(run("inspect", str(folder)), "model.safetensors", "truncated or corrupt")


def test_corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_bad_input(run("generate", str(folder), "-n", "2"), "model.safetensors", "corrupt")


def test_pth_needing_unsafe_unpickling_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": OrderedDict(w=torch.zeros(2)), "extra": NotATensor()}, p)
    assert_bad_input(run("inspect", str(p)), "evil.pth", "unsafe unpickling")


def test_truncated_pth(tmp_path):
    p = tmp_path / "cut.pth"
    torch.save({"model": {"transformer.wte.weight": torch.zeros(4, 4)}}, p)
    p.write_bytes(p.read_bytes()[:100])
    assert_bad_input(run("inspect", str(p)), "cut.pth", "truncated")


def test_missing_tensor(folder):
    edit_tensors(folder, lambda sd: sd.pop("model.layers.1.attn.w_proj.weight"))
    assert_bad_input(run("inspect", str(folder)), "model.layers.1.attn.w_proj.weight", "missing")


def test_unexpected_tensor(folder):
    edit_tensors(folder, lambda sd: sd.__setitem__("model.layers.0.attn.extra.weight", torch.zeros(3)))
    assert_bad_input(run("inspect", str(folder)), "model.layers.0.attn.extra.weight", "unexpected")


def test_wrongly_shaped_tensor(folder):
    edit_tensors(folder, lambda sd: sd.__setitem__("model.layers.0.attn.o_norm.weight", torch.ones(64)))
    assert_bad_input(run("inspect", str(folder)), "model.layers.0.attn.o_norm.weight", "[64]", "[128]")


def test_nan_weights(folder):
    def poison(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    edit_tensors(folder, poison)
    assert_bad_input(run("generate", str(folder)), "model.layers.1.mlp.up_proj.weight", "NaN")


def test_config_contradicting_tensors(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_heads"], cfg["head_dim"] = 2, 64
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("inspect", str(folder)), "contradicts", "config.json")


def test_invalid_config_value(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["output_gate_activation"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("inspect", str(folder)), "config.json", "output_gate_activation")


def test_existing_output_needs_force(tmp_path, folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(run("convert", str(folder), "-o", str(out)), "out", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run("convert", str(folder), "-o", str(out), "--force").exit_code == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_failed_convert_writes_nothing(tmp_path, folder):
    edit_tensors(folder, lambda sd: sd.pop("lm_head.weight"))
    out = tmp_path / "converted"
    assert_bad_input(run("convert", str(folder), "-o", str(out)), "lm_head.weight")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]


def test_2025_fla_prototype_is_refused(folder):
    def prototype(sd):
        for i in range(2):
            sd.pop(f"model.layers.{i}.attn.w_proj.weight")
            sd[f"model.layers.{i}.attn.b_proj.weight"] = torch.zeros(1, 128)
    edit_tensors(folder, prototype)
    assert_bad_input(run("inspect", str(folder)), "prototype", "b_proj")


def test_megatron_fused_layout_is_refused(tmp_path):
    p = tmp_path / "megatron.pth"
    torch.save({"transformer.wte.weight": torch.zeros(8, 4), "transformer.h.0.attn.in_proj.weight": torch.zeros(8, 4),
                "transformer.h.0.attn.A_log": torch.zeros(1)}, p)
    assert_bad_input(run("inspect", str(p)), "megatron.pth", "Megatron")


def test_gdn2_plus_model_type_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gdn2_plus"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("inspect", str(folder)), "gdn2_plus")
