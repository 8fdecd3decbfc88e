"""State options through the CLI: quantize --state*, compare --stream, compare --task recall, sensitivity."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import gdn2q
from gdn2q.cli import app
from gdn2q.quant.state import StateQuantConfig

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def test_quantize_stores_the_state_format(tmp_path, checkpoint):
    out = tmp_path / "q"
    r = run("quantize", str(checkpoint("tiny")), "--recipe", "int8-wo", "--state", "int8", "--state-rounding",
            "error-feedback", "--conv-state", "int8", "-o", str(out))
    assert r.exit_code == 0, r.output
    section = json.loads((out / "config.json").read_text())["quantization"]
    assert section["state"] == StateQuantConfig("int8", rounding="error-feedback", conv="int8").to_dict()
    model = gdn2q.load_model(out)
    assert model.state_format == StateQuantConfig("int8", rounding="error-feedback", conv="int8")
    state = model.new_state(1)
    assert state.layers[0].conv.dtype == "int8"


def test_compare_stream_json(checkpoint, corpus):
    r = run("compare", str(checkpoint("tiny")), "--stream", "--state", "int8", "--state-rounding", "error-feedback",
            "--data", str(corpus("shakespeare_eval.txt")), "--concat", str(corpus("milton_eval.txt")),
            "--max-tokens", "301", "--bucket", "100", "--json", "-")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert {"kl_mean", "top1_agreement", "ppl_increase", "by_position", "base", "candidate"} <= set(res)
    assert [b["start"] for b in res["by_position"]] == [0, 100, 200]
    assert set(res["by_position"][0]) >= {"start", "end", "kl_mean", "top1_agreement"}
    assert res["state"]["dtype"] == "int8" and 0 < res["kl_mean"] < 0.05


def test_compare_task_recall_json():
    r = run("compare", "--task", "recall", "--lengths", "256", "--sequences", "2", "--state", "int8", "--json", "-")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert list(res["runs"]) == ["int8/nearest"]
    assert 0 <= res["runs"]["int8/nearest"]["accuracy"]["256"] <= 1


@pytest.mark.parametrize(("args", "message"), [
    (("compare", "--task", "retrieval"), "unknown --task"),
    (("compare", "--task", "recall", "--lengths", "2x"), "--lengths"),
    (("compare", "--stream", "--state", "int4"), "unknown state dtype"),
    (("quantize", "--state", "int8", "--state-rounding", "up"), "unknown state rounding"),
])
def test_bad_state_options_exit_2(args, message):
    r = run(*args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
