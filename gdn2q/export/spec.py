"""What an exported folder holds and how its graph inputs/outputs are named (shared by exporter and runner).

Names follow onnxruntime-genai's recurrent-model convention: ``past_key_values.{i}.recurrent_state`` in,
``present.{i}.recurrent_state`` out (plus ``.conv_state``; ``.key`` / ``.value`` for sliding-window attention
layers). Torch-free on purpose: the runner imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gdn2q.errors import CheckpointError

SPEC_FILE = "gdn2q_onnx.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
OPSET = 21          # blocked QuantizeLinear/DequantizeLinear (the int8 state's per-row scales)
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
STATE_FORMATS = ("fp32", "int8")
PREFILL_MODES = ("graph", "step")
CONVENTIONS = {
    "input_ids": "[batch, T] int64; T = 1 when prefill is 'step'",
    "position_ids": "[batch, T] int64, each token's absolute position (p0, p0 + 1, ...); only with attention layers",
    "logits": "[batch, T, vocab] float32",
    "conv_state": "[batch, 2*key_dim + value_dim, conv_size] float32: raw q|k|v projections of the last conv_size "
                  "tokens, oldest first",
    "recurrent_state": "[batch, HV, K, V] S[k, v]; int8 state: codes, value = code * recurrent_state_scale[..., None]",
    "key/value": "[batch, kv_heads, window, head_dim] after RoPE; slot j holds position p0 - window + j; slots "
                 "before position 0 are masked",
    "new sequence": "every state tensor zero, position 0; present.* of one call is past_key_values.* of the next",
}


def past(i: int, what: str) -> str:
    return f"past_key_values.{i}.{what}"


def present(i: int, what: str) -> str:
    return f"present.{i}.{what}"


@dataclass
class StateTensor:
    """One per-layer state tensor: its suffix (``recurrent_state``, ``conv_state``, ...), dtype and shape.

    ``shape[0]`` is the batch (``"batch"``); an attention layer without a window has a growing
    ``"past_len"`` axis.
    """

    layer: int
    name: str
    dtype: str
    shape: list[int | str]

    @property
    def input_name(self) -> str:
        return past(self.layer, self.name)

    @property
    def output_name(self) -> str:
        return present(self.layer, self.name)


@dataclass
class ExportSpec:
    """The JSON written beside model.onnx: enough for any runtime to drive the decode-step graph."""

    weights: str
    state: str
    vocab_size: int
    num_layers: int
    layer_types: list[str]                       # "gdn2" | "attention" per layer
    state_tensors: list[StateTensor]
    uses_position_ids: bool
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    source: str = ""
    opset: int = OPSET
    model_file: str = MODEL_FILE
    prefill: str = "graph"     # "graph": input_ids [B, T] with T dynamic; "step": T = 1, prompts fed token by token
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        names = ["input_ids"] + (["position_ids"] if self.uses_position_ids else [])
        return names + [t.input_name for t in self.state_tensors]

    @property
    def outputs(self) -> list[str]:
        return ["logits"] + [t.output_name for t in self.state_tensors]

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = self.inputs
        d["outputs"] = self.outputs
        d["conventions"] = CONVENTIONS
        return d

    def write(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ExportSpec:
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; {folder} is not a folder written by `gdn2q export-onnx`")
        try:
            d = json.loads(path.read_text())
            for derived in ("inputs", "outputs", "conventions"):
                d.pop(derived, None)
            d["state_tensors"] = [StateTensor(**t) for t in d["state_tensors"]]
            spec = cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable export description ({e}); export the model again") from e
        if spec.format_version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {spec.format_version}, this gdn2q reads "
                                  f"{FORMAT_VERSION}; export the model again with this version")
        return spec
