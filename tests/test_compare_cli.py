"""The main job through the CLI: calibrate -> quantize -> compare, and what bad input gets (exit 2, one line)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gdn2q.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """calibrate and quantize the bundled model once (short windows, few tokens)."""
    d = tmp_path_factory.mktemp("main_job")
    r = run("calibrate", "--seq-len", "64", "--max-tokens", "256", "-o", str(d / "calib.safetensors"))
    assert r.exit_code == 0, r.output
    r = run("quantize", "--recipe", "w8a8-int8", "--calib", str(d / "calib.safetensors"), "-o", str(d / "q"))
    assert r.exit_code == 0, r.output
    assert "after" in r.output and "SmoothQuant" in r.output
    return d


def test_main_job(work):
    r = run("compare", str(work / "q"), "--seq-len", "64", "--max-tokens", "256", "--report", str(work / "rep"),
            "--json", str(work / "out.json"))
    assert r.exit_code == 0, r.output
    assert "top-1 agree" in r.output and "by position" in r.output
    out = json.loads((work / "out.json").read_text())
    assert {"base", "candidate", "kl_mean", "kl_p999", "top1_agreement", "tokens", "by_position"} <= set(out)
    assert out["recipe"] == "w8a8-int8" and out["tokens"] == 4 * 63 and 0 < out["kl_mean"] < 0.01
    assert {p.name for p in (work / "rep").iterdir()} == {"report.md", "drift.png", "compare.json"}
    r = run("compare", str(work / "q"), str(work / "q"), "--seq-len", "64", "--max-tokens", "128", "--json", "-")
    assert r.exit_code == 0 and json.loads(r.output)["kl_mean"] == 0


@pytest.mark.parametrize("args, message", [
    (["quantize", "--recipe", "int3", "-o", "{d}/x"], "known recipes: int8-wo"),
    (["quantize", "--recipe", "w8a8-fp8", "-o", "{d}/x"], "recipes that run here"),
    (["quantize", "--recipe", "w8a8-int8", "-o", "{d}/x"], "--calib"),
    (["quantize", "-o", "{d}/q"], "already exists"),
    (["quantize", "{d}/q", "-o", "{d}/x"], "already quantized"),
    (["calibrate", "--data", "{d}/empty.txt", "-o", "{d}/c.safetensors"], "empty"),
    (["calibrate", "--data", "{d}/binary.txt", "-o", "{d}/c.safetensors"], "binary"),
    (["calibrate", "--data", "{d}/short.txt", "-o", "{d}/c.safetensors"], "only"),
    (["compare", "{d}/q", "--data", "{d}/empty.txt"], "empty"),
    (["compare", "a", "b", "c"], "[BASE] CANDIDATE"),
])
def test_bad_input_is_one_line_and_exit_2(work, args, message):
    (work / "empty.txt").write_text("")
    (work / "binary.txt").write_bytes(b"\x00\x01\x02")
    (work / "short.txt").write_text("To be.\n")
    r = run(*[a.format(d=work) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (work / "x").exists() and not (work / "c.safetensors").exists()
