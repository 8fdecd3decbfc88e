"""Run an exported GDN-2 folder with onnxruntime: numpy, onnxruntime and tokenizers only (no torch).

    runner = OnnxGDN2Runner("out/tiny-onnx")
    print(runner.generate_text("ROMEO:", max_new_tokens=40))

One graph serves prompt and decode: ``input_ids`` [B, T] with the past state in, logits [B, T, V] and the
present state out. Folders exported with ``--prefill step`` have T fixed to 1 (no Scan op, for runtimes without
control flow); their prompts are fed one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gdn2q.errors import CheckpointError, DataError
from gdn2q.export.spec import TOKENIZER_FILE, ExportSpec

NUMPY_DTYPES = {"float32": np.float32, "int8": np.int8, "int64": np.int64}


@dataclass
class OnnxState:
    """Per-sequence decode state: the graph's past tensors by input name, and each row's next position."""

    tensors: dict[str, np.ndarray]
    position: np.ndarray                         # [B] int64

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class OnnxGDN2Runner:
    """Drive the decode-step graph of a folder written by ``gdn2q export-onnx``."""

    def __init__(self, folder: str | Path, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.folder = Path(folder)
        self.spec = ExportSpec.read(self.folder)
        model = self.folder / self.spec.model_file
        if not model.is_file():
            raise CheckpointError(f"{model}: not found; export the model again with `gdn2q export-onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise CheckpointError(f"{model}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                                  "export the model again") from e
        self._outputs = self.spec.outputs
        self._tokenizer = None

    # ---- state ----
    def new_state(self, batch_size: int = 1) -> OnnxState:
        """Zeros at position 0: what the graph expects before a sequence's first token."""
        tensors = {}
        for t in self.spec.state_tensors:
            shape = [batch_size if s == "batch" else (0 if isinstance(s, str) else s) for s in t.shape]
            tensors[t.input_name] = np.zeros(shape, dtype=NUMPY_DTYPES[t.dtype])
        return OnnxState(tensors, np.zeros(batch_size, dtype=np.int64))

    # ---- model ----
    def run(self, token_ids: np.ndarray, state: OnnxState) -> np.ndarray:
        """Tokens [B, T] (T = 1 for ``--prefill step`` folders) -> logits [B, T, V]; ``state`` advances."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.shape[0] != state.position.shape[0]:
            raise DataError(f"{ids.shape[0]} sequences for a state of batch {state.position.shape[0]}")
        feeds = {"input_ids": ids, **state.tensors}
        if self.spec.uses_position_ids:
            feeds["position_ids"] = state.position[:, None] + np.arange(ids.shape[1], dtype=np.int64)
        out = self.session.run(self._outputs, feeds)
        for t, value in zip(self.spec.state_tensors, out[1:], strict=True):
            state.tensors[t.input_name] = value
        state.position = state.position + ids.shape[1]
        return out[0]

    def step(self, token_ids: np.ndarray, state: OnnxState) -> np.ndarray:
        """One token per sequence ([B] or [B, 1]) -> logits [B, vocab]; ``state`` advances in place."""
        return self.run(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1), state)[:, 0]

    def prefill(self, token_ids: np.ndarray, state: OnnxState | None = None,
                return_all: bool = False) -> tuple[np.ndarray, OnnxState]:
        """Feed a prompt [B, T]; returns (last logits [B, V] or all [B, T, V], state)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] == 0:
            raise DataError("empty prompt: give at least one token")
        state = state or self.new_state(ids.shape[0])
        if self.spec.prefill == "graph":
            logits = self.run(ids, state)
        else:
            logits = np.stack([self.step(ids[:, t], state) for t in range(ids.shape[1])], axis=1)
        return (logits if return_all else logits[:, -1]), state

    def generate(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, eos_token_id: int | None = None,
                 state: OnnxState | None = None) -> list[int]:
        """Greedy (temperature 0) or sampled continuation of one prompt; stops early at ``eos_token_id``."""
        logits, state = self.prefill(np.asarray(prompt_ids, dtype=np.int64)[None], state)
        rng = np.random.default_rng(seed)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = sample(logits[0], temperature, top_k, rng)
            out.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
            logits = self.step(np.array([nxt]), state)
        return out

    # ---- text ----
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.folder / TOKENIZER_FILE
            if not path.is_file():
                raise DataError(f"{path}: not found; copy the model's tokenizer.json into the export folder")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise DataError("the prompt encodes to no tokens; give some text")
        return self.tokenizer.decode(self.generate(ids, max_new_tokens, **kwargs))


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Greedy at temperature <= 0, else a draw from softmax(logits / T) restricted to the top k."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.partition(z, -min(top_k, z.size))[-min(top_k, z.size)]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))
