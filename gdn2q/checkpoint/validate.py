"""Checks a state dict against the model its config describes, and refuses GDN-2 look-alikes."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gdn2q.config import GDN2Config
from gdn2q.errors import CheckpointError, ConfigError

_LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(?:attn)\.(.+)$")


def refuse_lookalikes(keys: list[str], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Formats that share GDN-2's names but not its math (GDN2_SPEC.md 5.2, 6.10)."""
    mixer_keys: dict[int, set[str]] = {}
    for k in keys:
        m = _LAYER_KEY.match(k)
        if m:
            mixer_keys.setdefault(int(m.group(1)), set()).add(m.group(2))
    for i, names in sorted(mixer_keys.items()):
        if "in_proj.weight" in names or "conv1d.weight" in names:
            raise CheckpointError(
                f"{path}: layer {i} has a fused 'in_proj'/'conv1d' mixer (Megatron-LM GatedDeltaNet2 layout); "
                "gdn2q reads fla-layout folders and lit_gpt .pth files: export the model to one of those")
        if any("householder" in n or n.startswith("plus") for n in names):
            raise CheckpointError(f"{path}: layer {i} is a GatedDeltaNet2Plus (gdn2_plus) layer, not GDN-2")
        b_key = next((k for k in keys if k.endswith(f".{i}.attn.b_proj.weight")), None)
        q_key = next((k for k in keys if k.endswith(f".{i}.attn.q_proj.weight")), None)
        scalar_beta = b_key and q_key and shapes[b_key][0] != shapes[q_key][0]
        if "A_log" in names and "w_proj.weight" not in names and scalar_beta:
            prefix = b_key
            raise CheckpointError(
                f"{path}: tensor {prefix} {list(shapes[prefix])} with no w_proj is the 2025 fla 'gdn2' prototype "
                "(scalar beta, the precursor of KDA), not Gated DeltaNet-2; it cannot be loaded as GDN-2")


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path) -> None:
    """Same names, same shapes, finite values; the message names the tensor and the fix."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]} (shape {list(expected[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete or its config describes a different model")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1
                                                           else "")
            + "; the config describes a different model than the weights (fix config.json or pass --config)")
    for k, ref in expected.items():
        t = found[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(
                f"{path}: tensor {k} has shape {list(t.shape)} but the config implies {list(ref.shape)}; "
                "the config contradicts the weights: fix config.json (or pass --config)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: tensor {k} holds {bad} NaN/Inf values; the checkpoint is corrupt or training diverged: "
                "use an earlier checkpoint")


def expected_tensors(config: GDN2Config) -> dict[str, torch.Tensor]:
    """Names and shapes the model built from ``config`` needs (meta tensors, no memory)."""
    from gdn2q.model import GDN2ForCausalLM

    with torch.device("meta"):
        model = GDN2ForCausalLM(config)
    return dict(model.state_dict())
