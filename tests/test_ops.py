"""The chunked (WY) form against the token-serial reference on fresh random inputs, and the step against the spec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdn2q.ops import chunk_gdn2, gdn2_step, recurrent_gdn2


def random_inputs(B, T, H, K, V, seed, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    gd = -torch.rand(B, T, H, K, generator=g) * decay_scale
    b = torch.rand(B, T, H, K, generator=g)
    w = torch.rand(B, T, H, V, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, gd, b, w, s0


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 150), K=st.sampled_from([16, 32]), V=st.sampled_from([16, 48]), seed=st.integers(0, 10**6),
       use_state=st.booleans())
def test_chunk_equals_serial(T, K, V, seed, use_state):
    q, k, v, g, b, w, s0 = random_inputs(2, T, 2, K, V, seed)
    init = s0 if use_state else None
    o1, s1 = recurrent_gdn2(q, k, v, g, b, w, init)
    o2, s2 = chunk_gdn2(q, k, v, g, b, w, init)
    assert (o1 - o2).abs().max() < 1e-4
    assert (s1 - s2).abs().max() < 1e-4 * max(1.0, s1.abs().max().item())


def test_chunk_is_stable_under_strong_decay():
    """A chunk that decays by e^-3000 must not overflow: no gamma_i / gamma_j quotients."""
    q, k, v, g, b, w, s0 = random_inputs(1, 130, 2, 16, 16, 3, decay_scale=50.0)
    o1, s1 = recurrent_gdn2(q, k, v, g, b, w, s0)
    o2, s2 = chunk_gdn2(q, k, v, g, b, w, s0)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    assert (o1 - o2).abs().max() < 1e-4


def test_step_follows_the_spec_pseudocode():
    """GDN2_SPEC 1.3, written out per element in float64."""
    torch.manual_seed(0)
    K, V = 4, 3
    S = torch.randn(K, V, dtype=torch.float64)
    q, k, gd, b = (torch.randn(K, dtype=torch.float64) for _ in range(4))
    v, w = torch.randn(V, dtype=torch.float64), torch.rand(V, dtype=torch.float64)
    expected = S.clone()
    for i in range(K):
        expected[i] *= gd[i].exp()
    r = sum(b[i] * k[i] * expected[i] for i in range(K))
    u = w * v - r
    expected = expected + torch.outer(k, u)
    o_expected = sum(q[i] * expected[i] for i in range(K))
    o, s = gdn2_step(*(t.view(1, 1, -1) for t in (q, k, v, gd, b, w)), S.view(1, 1, K, V))
    assert torch.allclose(s[0, 0], expected) and torch.allclose(o[0, 0], o_expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_follows_v_and_state_is_fp32(dtype):
    q, k, v, g, b, w, _ = random_inputs(1, 70, 1, 16, 16, 1)
    o, s = chunk_gdn2(q.to(dtype), k.to(dtype), v.to(dtype), g, b.to(dtype), w.to(dtype))
    assert o.dtype == dtype and s.dtype == torch.float32
