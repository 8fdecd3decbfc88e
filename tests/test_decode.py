"""Prefill + one-token steps from the explicit state equals one full forward (attention window included)."""

from __future__ import annotations

import pytest
import torch

import gdn2q


@pytest.mark.parametrize("prompt_len", [100, 3])
def test_prefill_then_64_steps_equals_full_forward(checkpoint, prompt_len):
    model = gdn2q.load_model(checkpoint("tiny-hybrid"))
    assert model.config.attn.window_size == 64
    gen = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len + 64), generator=gen)
    with torch.no_grad():
        full = model(ids)
        state = model.new_state(2)
        parts = [model(ids[:, :prompt_len], state)]
        for t in range(prompt_len, ids.shape[1]):
            parts.append(model(ids[:, t:t + 1], state))
    stepped = torch.cat(parts, dim=1)
    assert state.offset == ids.shape[1]
    assert (stepped - full).abs().max().item() < 1e-4
    # the attention layer keeps exactly its window, the GDN-2 layers their conv windows
    attn_state = state.layers[1]
    assert attn_state.key.shape[2] == 64
    assert state.layers[0].conv[0].shape[-1] == model.config.conv_size


def test_generate_greedy_matches_argmax_of_full_forward():
    model = gdn2q.load_model()
    ids = torch.tensor([[5, 17, 300, 42]])
    out = model.generate(ids, max_new_tokens=12)
    seq = torch.cat([ids, out], 1)
    with torch.no_grad():
        logits = model(seq)
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), out)
