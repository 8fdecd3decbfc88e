"""Sensitivity ranking and the --recipe auto policy search (tiny fixture, short windows)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gdn2q
from gdn2q.cli import app
from gdn2q.data import load_tokenizer, tokenize_file, windows
from gdn2q.quant.sensitivity import EvalSet, auto_policy, linear_groups, quantize_linears, sensitivity
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def setup():
    model = gdn2q.load_model(shared_path("checkpoints", "tiny"))
    text = shared_path("data", "corpus", "shakespeare_eval.txt")
    ids = tokenize_file(load_tokenizer(model.tokenizer_path), text, max_tokens=3 * 64)
    return model, EvalSet.build(model, windows(ids, 64))


def test_groups_cover_every_linear(setup):
    model, _ = setup
    groups = linear_groups(model)
    assert list(groups) == ["qkv", "b_proj", "w_proj", "f_proj", "g_proj", "o_proj", "mlp", "lm_head"]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(len(v) for v in groups.values()) == n_linear


def test_quantize_linears_touches_only_the_group(setup):
    model, evalset = setup
    import copy

    q = quantize_linears(copy.deepcopy(model), linear_groups(model)["mlp"], "int8-wo")
    assert type(q.model.layers[0].mlp.gate_proj.weight) is not torch.Tensor
    assert type(q.model.layers[0].attn.q_proj.weight) is torch.nn.Parameter
    assert evalset.measure(model)["kl_mean"] < 1e-9 < evalset.measure(q)["kl_mean"]


def test_ranking_and_auto_policy(setup):
    model, evalset = setup
    ranking = sensitivity(model, evalset)
    assert {r["group"] for r in ranking} == {*linear_groups(model), "state"}
    kls = [r["kl_mean"] for r in ranking]
    assert kls == sorted(kls, reverse=True) and all(k > 0 for k in kls)
    generous = auto_policy(model, evalset, ranking, max_ppl_increase=0.05)
    assert generous["within_budget"] and generous["result"]["ppl_increase"] <= 0.05
    assert set(generous["quantized_groups"]) == {"qkv", "b_proj", "w_proj", "f_proj", "g_proj", "o_proj", "mlp"}
    tight = auto_policy(model, evalset, ranking[:3], max_ppl_increase=-1.0)     # nothing can fit a negative budget
    assert tight["quantized_groups"] == [] and tight["state"]["dtype"] == "fp32" and not tight["within_budget"]


def test_cli_json(checkpoint, corpus):
    r = CliRunner().invoke(app, ["sensitivity", str(checkpoint("tiny")), "--data", str(corpus("milton_eval.txt")),
                                 "--seq-len", "32", "--windows", "2", "--recipe", "auto", "--json"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["ranking"][0]["kl_mean"] >= res["ranking"][-1]["kl_mean"]
    assert res["auto"]["quantize_options"].startswith("--recipe int8-wo")
