"""The foundation commands on the bundled model: inspect, generate, convert, --help."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gdn2q.cli import app


def run(*args):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def test_inspect_json_reports_groups_and_state_bytes():
    info = json.loads(run("inspect", "--json").stdout)
    assert info["format"] == "fla" and info["config"]["attn"]["layers"] == [1]
    assert info["parameters"] == sum(g["params"] for g in info["groups"].values()) == 1_970_692
    rec = info["state_bytes_per_sequence"]["recurrent"]
    assert rec["fp32"]["per_layer"] == 2 * 64 * 64 * 4
    assert 0.25 < rec["int8"]["ratio_to_fp32"] < 0.27


def test_inspect_table_mentions_every_group():
    out = run("inspect").stdout
    for group in ("qkv", "b_proj", "w_proj", "mlp", "lm_head", "recurrent state"):
        assert group in out


def test_generate_greedy_is_deterministic_and_sampling_follows_the_seed():
    a = json.loads(run("generate", "--prompt", "KING:", "-n", "8", "--json").stdout)
    b = json.loads(run("generate", "--prompt", "KING:", "-n", "8", "--json").stdout)
    assert a["token_ids"] == b["token_ids"] and a["new_tokens"] == 8
    s1 = json.loads(run("generate", "-n", "8", "--temperature", "1.0", "--seed", "1", "--json").stdout)
    s2 = json.loads(run("generate", "-n", "8", "--temperature", "1.0", "--seed", "1", "--json").stdout)
    assert s1["token_ids"] == s2["token_ids"]


@pytest.mark.parametrize("command", ["inspect", "generate", "convert"])
def test_help_teaches(command):
    out = run(command, "--help").stdout
    assert "Example" in out
