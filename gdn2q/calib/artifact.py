"""The calibration artifact: one safetensors file of statistics plus metadata naming the model it describes.

Keys: ``linear.<module>.absmax`` [in_features] (and ``.percentile`` / ``.mse`` when asked),
``gate.<layer>.{b,w,g}.{min,max,mean}`` ([H, K] for b and g, [HV, V] for w), ``state.<layer>.absmax``
[HV, K] (max over tokens and value columns of |S|). Metadata: format, version, model hash and name, data
hash and name, tokens, seq_len.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gdn2q.checkpoint import sha256_of
from gdn2q.checkpoint.io import atomic_file, read_safetensors, write_safetensors
from gdn2q.errors import DataError

FORMAT = "gdn2q-calibration"
FORMAT_VERSION = "1"
META_KEY = "gdn2q"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the checkpoint the model was loaded from (what a calibration file is tied to)."""
    src = getattr(model, "source_path", None)
    if src is None:
        raise DataError("this model was not loaded from a checkpoint (no source_path); load it with "
                        "gdn2q.load_model so its calibration can be tied to it")
    return sha256_of(Path(src))


@dataclass
class CalibrationData:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def linear_stat(self, module: str, stat: str = "absmax") -> torch.Tensor | None:
        return self.tensors.get(f"linear.{module}.{stat}")

    def state_absmax(self) -> dict[int, torch.Tensor]:
        """{GDN-2 layer index: [HV, K] max |S|} for static state scales."""
        return {int(k.split(".")[1]): v for k, v in self.tensors.items()
                if k.startswith("state.") and k.endswith(".absmax")}

    def save(self, path: Path, force: bool = False) -> Path:
        """Write the file; the metadata is one JSON string with sorted keys, because safetensors writes a
        metadata map in hash order, which would make equal calibrations differ byte-wise."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta}
        with atomic_file(Path(path), force) as tmp:
            write_safetensors(self.tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        return Path(path)

    def check_for(self, model: nn.Module) -> None:
        """Refuse a calibration made for another model (other weights or other module shapes)."""
        name = self.path or "calibration"
        want = self.meta.get("model_sha256")
        have = model_fingerprint(model)
        if want != have:
            raise DataError(
                f"{name}: made for model {self.meta.get('model_name', '?')} (sha256 {str(want)[:12]}), not for "
                f"{Path(model.source_path).name} (sha256 {have[:12]}); run gdn2q calibrate on this model")
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear):
                t = self.linear_stat(n)
                if t is None or t.numel() != m.in_features:
                    raise DataError(f"{name}: no statistics of shape [{m.in_features}] for Linear {n}; "
                                    "run gdn2q calibrate on this model")


def load_calibration(path: str | Path) -> CalibrationData:
    """Read a calibration file written by ``gdn2q calibrate`` (refuses other safetensors files)."""
    path = Path(path)
    tensors, raw = read_safetensors(path)
    try:
        meta = json.loads(raw.get(META_KEY, "{}"))
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a gdn2q calibration file (metadata format {meta.get('format')!r}); "
                        "make one with gdn2q calibrate")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: calibration format version {meta.get('format_version')}, this gdn2q reads "
                        f"{FORMAT_VERSION}; run gdn2q calibrate again")
    return CalibrationData(tensors, {k: v for k, v in meta.items() if k not in ("format", "format_version")}, path)
