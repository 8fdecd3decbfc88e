"""SmoothQuant folding: exact in floating point, scales as the paper defines them."""

from __future__ import annotations

import torch
from torch import nn

import gdn2q
from gdn2q.calib import calibrate
from gdn2q.quant.smoothquant import smooth_groups, smooth_model, smoothing_scales


def test_folding_keeps_the_function():
    model = gdn2q.load_model()
    gen = torch.Generator().manual_seed(3)
    calib = calibrate(model, torch.randint(0, 4096, (128,), generator=gen), seq_len=64, batch_size=2)
    ids = torch.randint(0, 4096, (2, 40), generator=gen)
    with torch.no_grad():
        before = model(ids)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    folded = smooth_model(model, calib, alpha=0.5, quantized=linears)
    assert "model.layers.0.attn_norm.weight" in folded and "model.layers.0.attn.o_norm.weight" in folded
    assert "model.layers.1.attn.v_proj" in folded and "model.layers.0.mlp.up_proj" in folded
    with torch.no_grad():
        after = model(ids)
    assert torch.allclose(before, after, atol=2e-4, rtol=1e-4)
    assert not torch.equal(before, after)      # weights really changed


def test_scales_formula_and_tied_heads():
    act = torch.tensor([4.0, 1.0, 9.0, 1.0])
    w = torch.tensor([[1.0, 4.0, 1.0, 1.0], [0.5, 1.0, 1.0, 16.0]])
    s = smoothing_scales(act, [w], alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 3.0, 0.25]))
    tied = smoothing_scales(act, [w], alpha=0.5, period=2)      # channels (0, 2) and (1, 3) share a scale
    assert torch.allclose(tied, torch.tensor([3.0, 0.25]))


def test_only_groups_with_quantized_consumers_are_touched():
    model = gdn2q.load_model()
    calib = calibrate(model, torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(4)), seq_len=64)
    folded = smooth_model(model, calib, 0.5, quantized={"model.layers.0.mlp.down_proj"})
    assert folded == ["model.layers.0.mlp.up_proj"]
    assert len(smooth_groups(model)) > 10


def test_clipped_statistics_drive_smoothing_when_asked():
    import pytest

    from gdn2q.errors import DataError

    model = gdn2q.load_model()
    ids = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(6))
    plain = calibrate(model, ids, seq_len=64)
    with pytest.raises(DataError, match="--clip percentile"):
        smooth_model(model, plain, 0.5, quantized={"model.layers.0.mlp.down_proj"}, stat="percentile")
    clipped = calibrate(model, ids, seq_len=64, clip=("absmax", "percentile"))
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    smooth_model(model, clipped, 0.5, quantized={"model.layers.0.mlp.down_proj"}, stat="percentile")
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
