"""GDN2Config covers every variant of the spec and refuses inconsistent ones."""

from __future__ import annotations

import pytest
import torch

from gdn2q.config import AttentionConfig, GDN2Config
from gdn2q.errors import ConfigError
from gdn2q.model import GDN2ForCausalLM


def test_defaults_are_the_official_layer():
    c = GDN2Config()
    assert (c.num_heads, c.head_dim, c.head_v_dim, c.value_heads, c.conv_size) == (16, 128, 128, 16, 4)
    assert c.key_dim == 2048 and c.value_dim == 2048


@pytest.mark.parametrize("bad", [
    dict(num_heads=3, num_v_heads=4),
    dict(output_gate_activation="relu"),
    dict(norm_eps=0.0),
    dict(head_dim=0),
    dict(expand_v=0.25, head_dim=10),
    dict(attn=AttentionConfig(layers=(5,), num_heads=4), num_hidden_layers=2),
    dict(attn=AttentionConfig(layers=(1,), num_heads=3), hidden_size=128),
])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        GDN2Config(**bad)


def test_round_trip_through_dict():
    c = GDN2Config(hidden_size=64, num_hidden_layers=3, num_heads=2, head_dim=16, num_v_heads=4, expand_v=2.0,
                   conv_bias=True, allow_neg_eigval=True, output_gate_activation="swish",
                   attn=AttentionConfig(layers=(1,), num_heads=4, num_kv_heads=2, window_size=8), vocab_size=97,
                   tie_word_embeddings=True, intermediate_size=96)
    assert GDN2Config.from_dict(c.to_dict()) == c


def test_every_variant_builds_and_decodes_consistently():
    """GVA, expand_v, conv bias, no short conv, negative eigenvalues, swish gate, GQA attention, tied embeddings."""
    torch.manual_seed(0)
    c = GDN2Config(hidden_size=64, num_hidden_layers=3, num_heads=2, head_dim=16, num_v_heads=4, expand_v=2.0,
                   conv_bias=True, allow_neg_eigval=True, output_gate_activation="swish", vocab_size=97,
                   attn=AttentionConfig(layers=(1,), num_heads=4, num_kv_heads=2, window_size=8),
                   tie_word_embeddings=True, intermediate_size=96)
    for variant in (c, c.replace(use_short_conv=False, attn=None)):
        model = GDN2ForCausalLM(variant).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        assert model.lm_head.weight is model.model.embeddings.weight
        ids = torch.randint(0, 97, (2, 30))
        with torch.no_grad():
            full = model(ids)
            model.set_recurrence("chunk")
            assert (model(ids) - full).abs().max() < 1e-4
            state = model.new_state(2)
            steps = torch.cat([model(ids[:, :7], state)] + [model(ids[:, t:t + 1], state) for t in range(7, 30)], 1)
        assert (steps - full).abs().max() < 1e-4


def test_state_bytes_per_sequence():
    c = GDN2Config(num_hidden_layers=2)
    sb = c.state_bytes_per_sequence()
    assert sb["recurrent_per_layer"] == 16 * 128 * 128 * 4 == 1 << 20
