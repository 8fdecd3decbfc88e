"""fla-layout Hugging Face folders: config.json + model.safetensors [+ tokenizer.json] (GDN2_SPEC.md 5.2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gdn2q.checkpoint.io import read_safetensors, write_safetensors
from gdn2q.config import GDN2Config
from gdn2q.errors import CheckpointError, ConfigError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def read_config_dict(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG}; an fla-layout folder needs config.json + model.safetensors")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or replace the file") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return d


def check_model_type(d: dict, path: Path) -> None:
    mt = str(d.get("model_type", "gdn2"))
    if mt not in ("gdn2", "gated_deltanet2", "gated_deltanet_2", "gdn_2"):
        raise CheckpointError(f"{path}: model_type {mt!r} is not a GDN-2 model; gdn2q loads GDN-2 checkpoints only")
    if "plus" in mt or "plus" in " ".join(map(str, d.get("architectures") or [])).lower():
        raise CheckpointError(f"{path}: {mt} is a GatedDeltaNet2Plus (gdn2_plus) model, not GDN-2")


def read_fla_folder(folder: Path) -> tuple[GDN2Config, dict[str, torch.Tensor], dict]:
    d = read_config_dict(folder)
    check_model_type(d, folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS}; an fla-layout folder needs config.json + model.safetensors")
    tensors, _ = read_safetensors(weights)
    config = GDN2Config.from_dict(d, source=str(folder / CONFIG))
    return config, tensors, {"format": "fla", "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}


def write_fla_folder(folder: Path, config: GDN2Config, tensors: dict[str, torch.Tensor],
                     tokenizer: Path | None = None, extra_config: dict | None = None) -> None:
    """Write into an (empty, temporary) folder; callers wrap this in ``atomic_dir``."""
    cfg = config.to_dict() | (extra_config or {})
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    write_safetensors(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    if tokenizer is not None and tokenizer.is_file():
        (folder / TOKENIZER).write_bytes(tokenizer.read_bytes())
