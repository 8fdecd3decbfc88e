"""`gdn2q export-onnx` and `gdn2q generate --onnx` on the bundled model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gdn2q.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "onnx"
    res = invoke("export-onnx", "-o", out, "--verify", "--verify-steps", "64", "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_export_verify_passes_and_reports(fp32_folder):
    _, info = fp32_folder
    v = info["verify"]
    assert v["passed"] and v["greedy_equal"] and v["decode_steps"] == 64
    assert v["max_abs_diff"] <= 1e-4
    assert info["outputs"][0] == "logits" and "present.0.conv_state" in info["outputs"]


def test_generate_with_onnx_matches_pytorch_greedy(fp32_folder):
    folder, _ = fp32_folder
    onnx = invoke("generate", "--onnx", folder, "-p", "KING HENRY:", "-n", "24", "--json")
    torch_ = invoke("generate", "-p", "KING HENRY:", "-n", "24", "--json")
    assert onnx.exit_code == 0 and torch_.exit_code == 0, onnx.output + torch_.output
    a, b = json.loads(onnx.stdout), json.loads(torch_.stdout)
    assert a["token_ids"] == b["token_ids"] and a["completion"] == b["completion"]


def test_failed_verify_exits_1_and_names_the_largest_difference(tmp_path):
    res = invoke("export-onnx", "-o", tmp_path / "o", "--verify", "--verify-steps", "4", "--atol", "1e-12")
    assert res.exit_code == 1
    assert "FAIL: max |logit diff|" in res.output and "vocab id" in res.output and "position" in res.output


@pytest.mark.parametrize("args,fragment", [
    (["--state", "fp8"], "--state fp8"),
    (["--weights", "int3"], "--weights int3"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, fragment):
    res = invoke("export-onnx", "-o", tmp_path / "o", *args)
    assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(fp32_folder):
    folder, _ = fp32_folder
    res = invoke("export-onnx", "-o", folder)
    assert res.exit_code == 2 and "--force" in res.output


def test_generate_onnx_refuses_a_non_export_folder(tmp_path):
    res = invoke("generate", "--onnx", tmp_path)
    assert res.exit_code == 2 and "gdn2q_onnx.json" in res.output
