"""Export a GDN-2 model to a self-contained ONNX folder: model.onnx (+ external data), tokenizer, description."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from gdn2q.checkpoint.io import atomic_dir, refuse_existing
from gdn2q.export.graph import build_graph, onnx_state_format
from gdn2q.export.quantize import BLOCK_SIZE, apply_weight_format
from gdn2q.export.spec import DATA_FILE, MODEL_FILE, TOKENIZER_FILE, ExportSpec

EXTERNAL_DATA_ABOVE = 1_800_000_000  # one protobuf cannot pass 2 GB; leave headroom for the graph itself


@dataclass
class ExportResult:
    folder: Path
    spec: ExportSpec
    onnx_bytes: int          # model.onnx plus its external data file

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "weights": self.spec.weights, "state": self.spec.state,
                "prefill": self.spec.prefill,
                "onnx_bytes": self.onnx_bytes, "inputs": self.spec.inputs, "outputs": self.spec.outputs}


def default_state(model: torch.nn.Module) -> str:
    """The ONNX state format matching the model's own decode-state format (fp32 unless it was quantized)."""
    return onnx_state_format(model.state_format)


def save_onnx(model: onnx.ModelProto, folder: Path) -> None:
    """model.onnx, with the weights in model.onnx.data when the protobuf would pass 2 GB."""
    path = folder / MODEL_FILE
    if model.ByteSize() > EXTERNAL_DATA_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def export_onnx(model: torch.nn.Module, out: Path, weights: str = "fp32", state: str | None = None,
                prefill: str = "graph", block_size: int | None = None, quantize_lm_head: bool = True,
                force: bool = False, tokenizer: Path | None = None) -> ExportResult:
    """Build the graph of ``model``, convert its weights, write the folder atomically."""
    refuse_existing(Path(out), force)                     # before the work, not only at the final rename
    state = state or default_state(model)
    graph, spec = build_graph(model, state, prefill)
    graph = apply_weight_format(graph, weights, block_size, quantize_lm_head)
    spec.weights = weights
    spec.source = str(getattr(model, "source_path", "") or "")
    source_recipe = (getattr(model, "quantization", None) or {}).get("recipe")
    spec.extra = {"block_size": block_size or BLOCK_SIZE.get(weights), "quantized_lm_head": quantize_lm_head
                  if weights in ("int8", "int4") else False, "state_scale": "value = code * scale per (head, key row)"
                  if state == "int8" else None, "source_quantization": source_recipe}
    tok = tokenizer or getattr(model, "tokenizer_path", None)
    with atomic_dir(Path(out), force) as tmp:
        save_onnx(graph, tmp)
        if tok is not None:
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        spec.write(tmp)
    folder = Path(out)
    size = sum((folder / f).stat().st_size for f in (MODEL_FILE, DATA_FILE) if (folder / f).exists())
    return ExportResult(folder, spec, size)
