"""NVIDIA lit_gpt .pth checkpoints: inferred architecture, key mapping, fused attention split, convert round trip."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gdn2q
from gdn2q.checkpoint import litgpt, read_checkpoint
from gdn2q.cli import app
from gdn2q.errors import ConfigError


def lit_state_dict_from_fla(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Test-side mapping written straight from GDN2_SPEC.md 5.3 (independent of the package's own)."""
    out = {"transformer.wte.weight": tensors["model.embeddings.weight"],
           "transformer.ln_f.weight": tensors["model.norm.weight"],
           "lm_head.weight": tensors["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "norm_1.weight"] = tensors[src + "attn_norm.weight"]
        out[dst + "norm_2.weight"] = tensors[src + "mlp_norm.weight"]
        out[dst + "mlp.swiglu.w1.weight"] = tensors[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.swiglu.w2.weight"] = tensors[src + "mlp.up_proj.weight"]
        out[dst + "mlp.swiglu.w3.weight"] = tensors[src + "mlp.down_proj.weight"]
        if config.is_attention_layer(i):
            a = config.attn
            hs, d = config.hidden_size // a.num_heads, config.hidden_size
            per = a.num_heads // a.kv_heads
            rows = []
            for grp in range(a.kv_heads):  # [q heads of the group..., k, v] per KV group
                rows += [tensors[src + "attn.q_proj.weight"][(grp * per + j) * hs:(grp * per + j + 1) * hs]
                         for j in range(per)]
                rows.append(tensors[src + "attn.k_proj.weight"][grp * hs:(grp + 1) * hs])
                rows.append(tensors[src + "attn.v_proj.weight"][grp * hs:(grp + 1) * hs])
            out[dst + "attn.attn.weight"] = torch.cat(rows).reshape(-1, d)
            out[dst + "attn.proj.weight"] = tensors[src + "attn.o_proj.weight"]
        else:
            for k, t in tensors.items():
                if k.startswith(src + "attn."):
                    out[dst + k[len(src):]] = t
    return out


def lit_semantics(config):
    """What a lit_gpt model computes: SiLU output gate, norm eps 1e-5."""
    return config.replace(output_gate_activation="swish", norm_eps=1e-5)


def make_pth(tmp_path, checkpoint, name, wrap=True):
    ckpt = read_checkpoint(checkpoint(name))
    sd = {k: v.float() for k, v in lit_state_dict_from_fla(ckpt.tensors, ckpt.config).items()}
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "optimizer": None, "hparams": {"name": "custom_run"}, "iter_num": 7} if wrap else sd,
               path)
    return path, ckpt


def reference_logits(ckpt, ids):
    ref = read_checkpoint(ckpt.path, lit_semantics(ckpt.config))
    from gdn2q.checkpoint import build_model

    with torch.no_grad():
        return build_model(ref)(ids)


IDS = torch.randint(0, 4096, (2, 80), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("wrap", [True, False])
def test_pure_gdn2_pth_loads_from_shapes_alone(tmp_path, checkpoint, wrap):
    path, ckpt = make_pth(tmp_path, checkpoint, "tiny", wrap)
    model = gdn2q.load_model(path)
    assert model.config.output_gate_activation == "swish" and model.config.norm_eps == 1e-5
    assert model.config.mlp_size == ckpt.config.mlp_size and model.config.head_dim == 128
    with torch.no_grad():
        assert torch.equal(model(IDS), reference_logits(ckpt, IDS))


def test_hybrid_pth_needs_config_for_attention_heads(tmp_path, checkpoint):
    path, ckpt = make_pth(tmp_path, checkpoint, "tiny-hybrid")
    with pytest.raises(ConfigError, match="--config"):
        gdn2q.load_model(path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(lit_semantics(ckpt.config).to_dict()))
    model = gdn2q.load_model(path, config=cfg_file)
    with torch.no_grad():
        assert (model(IDS) - reference_logits(ckpt, IDS)).abs().max() < 1e-5


def test_explicit_config_contradicting_tensors_is_refused(tmp_path, checkpoint):
    path, ckpt = make_pth(tmp_path, checkpoint, "tiny")
    with pytest.raises(ConfigError, match="num_heads"):
        gdn2q.load_model(path, config=ckpt.config.replace(num_heads=2, head_dim=64))


def test_package_mapping_matches_spec_mapping_both_ways(checkpoint):
    ckpt = read_checkpoint(checkpoint("tiny-hybrid"))
    lit = lit_state_dict_from_fla(ckpt.tensors, ckpt.config)
    back = litgpt.litgpt_to_fla(lit, ckpt.config)
    assert back.keys() == ckpt.tensors.keys()
    assert all(torch.equal(back[k], ckpt.tensors[k]) for k in back)
    again = litgpt.fla_to_litgpt(back, ckpt.config)
    assert again.keys() == lit.keys() and all(torch.equal(again[k], lit[k]) for k in lit)


def test_registered_config_names_are_recognised():
    assert litgpt.registered_name({"name": "swa_gdn2_1.3B_tsz1024x4k"}) == "swa_gdn2_1.3B"
    assert litgpt.registered_name({"name": "gdn2_1.3B_run"}) == "gdn2_1.3B"
    assert litgpt.registered_name({"name": "gdn2_plus_1.3B_x"}) is None


def test_convert_round_trips_a_pth(tmp_path, checkpoint):
    path, ckpt = make_pth(tmp_path, checkpoint, "tiny")
    out = tmp_path / "converted"
    res = CliRunner().invoke(app, ["convert", str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    a, b = gdn2q.load_model(path), gdn2q.load_model(out)
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))
    # and back: the converted folder re-exported to lit_gpt keys is the original state dict
    sd = torch.load(path, weights_only=True)["model"]
    conv = read_checkpoint(out)
    lit = litgpt.fla_to_litgpt(conv.tensors, conv.config)
    assert lit.keys() == sd.keys() and all(torch.equal(lit[k], sd[k]) for k in sd)
