"""Reading and writing GDN-2 checkpoints: format detection, readers per format, the fla-layout writer.

Formats: fla-layout folders (config.json + model.safetensors), NVIDIA lit_gpt ``.pth`` files, and gdn2q
quantized folders (an fla-layout folder whose config.json has a ``quantization`` section).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from gdn2q.checkpoint import fla, litgpt
from gdn2q.checkpoint.io import atomic_dir
from gdn2q.checkpoint.validate import check_state_dict, expected_tensors, refuse_lookalikes
from gdn2q.config import GDN2Config
from gdn2q.errors import CheckpointError

BUNDLED_NAME = "tiny-hybrid"
PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def bundled_model_path() -> Path:
    """The small real GDN-2 model shipped inside the package (used when no model path is given)."""
    return Path(str(resources.files("gdn2q") / "assets" / BUNDLED_NAME))


@dataclass
class Checkpoint:
    """A validated checkpoint in fla layout, whatever format it came from."""

    path: Path
    format: str
    config: GDN2Config
    tensors: dict[str, torch.Tensor]
    tokenizer: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return self.format == "gdn2q-quantized"


def detect_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        if (path / fla.CONFIG).is_file():
            d = fla.read_config_dict(path)
            return "gdn2q-quantized" if "quantization" in d else "fla"
        if any(path.glob("*.pth")):
            raise CheckpointError(f"{path}: a folder of .pth files; pass the checkpoint file itself "
                                  "(e.g. final-model-ckpt.pth)")
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json); expected an fla-layout folder "
                              "(config.json + model.safetensors) or a lit_gpt .pth file")
    if path.suffix in PTH_SUFFIXES:
        return "lit_gpt"
    if path.name == fla.WEIGHTS or path.name == fla.CONFIG:
        return "fla"
    raise CheckpointError(f"{path}: not a checkpoint (expected an fla-layout folder or a lit_gpt .pth file)")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path | None = None, config: str | Path | GDN2Config | None = None) -> Checkpoint:
    """Read and validate any supported checkpoint; ``config`` overrides what shapes cannot tell (lit_gpt)."""
    path = bundled_model_path() if path is None else Path(path)
    fmt = detect_format(path)
    explicit = GDN2Config.from_json(config) if isinstance(config, (str, Path)) else config
    if fmt in ("fla", "gdn2q-quantized"):
        folder = path if path.is_dir() else path.parent
        if fmt == "gdn2q-quantized":
            return Checkpoint(folder, fmt, GDN2Config.from_dict(fla.read_config_dict(folder)), {},
                              _tokenizer(folder), {"format": fmt})
        cfg, tensors, info = fla.read_fla_folder(folder)
        refuse_lookalikes(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, folder)
        cfg = explicit or cfg
        check_state_dict(expected_tensors(cfg), tensors, folder / fla.WEIGHTS)
        return Checkpoint(folder, fmt, cfg, tensors, _tokenizer(folder), info)
    sd, hparams = litgpt.read_litgpt_state_dict(path)
    refuse_lookalikes(list(sd), {k: tuple(v.shape) for k, v in sd.items()}, path)
    cfg = litgpt.infer_config(sd, path, hparams, explicit)
    tensors = litgpt.litgpt_to_fla(sd, cfg)
    check_state_dict(expected_tensors(cfg), tensors, path)
    info = {"format": "lit_gpt", "dtype": str(next(iter(sd.values())).dtype).replace("torch.", ""),
            "registered_config": litgpt.registered_name(hparams)}
    return Checkpoint(path, "lit_gpt", cfg, tensors, _tokenizer(path.parent), info)


def _tokenizer(folder: Path) -> Path | None:
    p = folder / fla.TOKENIZER
    return p if p.is_file() else None


def build_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from gdn2q.model import GDN2ForCausalLM

    with torch.device("meta"):
        model = GDN2ForCausalLM(ckpt.config)
    model.load_state_dict({k: v.float() for k, v in ckpt.tensors.items()}, assign=True, strict=True)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model.to_dtype(dtype).to(device)
    model.eval().requires_grad_(False)
    model.source_path = ckpt.path
    model.tokenizer_path = ckpt.tokenizer
    return model


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", config: str | Path | GDN2Config | None = None):
    """Load any supported GDN-2 checkpoint as a ready-to-run :class:`gdn2q.model.GDN2ForCausalLM`.

    ``path=None`` loads the small model bundled in the package.
    """
    ckpt = read_checkpoint(path, config)
    if ckpt.is_quantized:
        from gdn2q.quant.folder import load_quantized_folder

        return load_quantized_folder(ckpt.path, dtype=dtype, device=device)
    return build_model(ckpt, dtype, device)


def save_fla_folder(ckpt: Checkpoint, dest: Path, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``ckpt`` as an fla-layout folder (atomically; refuses to overwrite without ``force``)."""
    tensors = ckpt.tensors if dtype is None else {
        k: (v if k.rsplit(".", 1)[-1] in ("A_log", "dt_bias") else v.to(dtype)) for k, v in ckpt.tensors.items()}
    with atomic_dir(dest, force) as tmp:
        fla.write_fla_folder(tmp, ckpt.config, tensors, ckpt.tokenizer,
                             {"converted_from": {"format": ckpt.format, "path": str(ckpt.path)}})
    return dest
