"""Check an exported folder against the PyTorch model it came from, on a prompt plus greedy decode steps.

Both sides run the same token stream the same way: the prompt in one call (prefill), then one token per call,
the tokens PyTorch picks greedily; the logits of every position are compared (largest |difference| and where),
then onnxruntime generates greedily on its own and its tokens are compared with PyTorch's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from gdn2q.export.graph import dense_weights
from gdn2q.export.runner import OnnxGDN2Runner
from gdn2q.quant.state import StateQuantConfig

EXACT_ATOL = 1e-4                                    # fp32 weights and fp32 state: float32 rounding only
MIN_TOP1 = {"fp32": 0.99, "fp16": 0.99, "int8": 0.95, "int4": 0.85}   # fp32: a bf16/quantized PyTorch model


@dataclass
class VerifyReport:
    weights: str
    state: str
    prompt_tokens: int
    decode_steps: int
    max_abs_diff: float
    where: str                     # e.g. "decode step 12 (position 20), vocab id 331"
    top1_agreement: float
    greedy_equal: bool
    first_greedy_mismatch: int | None
    torch_tokens: list[int]
    onnx_tokens: list[int]
    atol: float | None             # None: quantized export, judged on top-1 agreement
    min_top1: float
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        limit = f"<= {self.atol:g}" if self.atol is not None else f"top-1 >= {self.min_top1:g}"
        return (f"{verdict}: max |logit diff| {self.max_abs_diff:.3g} at {self.where}; top-1 agreement "
                f"{self.top1_agreement:.4f}; greedy tokens {'equal' if self.greedy_equal else 'differ'} "
                f"({self.decode_steps} steps); criterion {limit}")


def _locate(diff: np.ndarray, n_prompt: int) -> str:
    pos, vocab = np.unravel_index(int(np.argmax(diff)), diff.shape)
    if pos < n_prompt:
        return f"prompt token {pos} (position {pos}), vocab id {vocab}"
    return f"decode step {pos - n_prompt + 1} (position {pos}), vocab id {vocab}"


def is_plain_fp32(model: torch.nn.Module) -> bool:
    return all(p.dtype == torch.float32 and type(p.data) is torch.Tensor for p in model.parameters())


def fp32_reference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` if it is a plain fp32 model, else a plain fp32 copy with its dequantized weights: exactly the
    function the exported graph computes, so the export itself can be checked to float32 rounding."""
    if is_plain_fp32(model):
        return model
    from gdn2q.model import GDN2ForCausalLM

    ref = GDN2ForCausalLM(model.config)
    weights = dense_weights(model)
    ref.load_state_dict({k: torch.from_numpy(weights[k]) for k in ref.state_dict()}, strict=True)
    ref.eval().requires_grad_(False)
    ref.state_format, ref.state_scales = model.state_format, model.state_scales
    ref.tokenizer_path, ref.source_path = model.tokenizer_path, model.source_path
    return ref


@torch.no_grad()
def verify_export(runner: OnnxGDN2Runner, model: torch.nn.Module, prompt_ids: list[int], steps: int = 64,
                  atol: float | None = None, min_top1: float | None = None) -> VerifyReport:
    """Compare onnxruntime with PyTorch over ``prompt_ids`` and ``steps`` greedy decode steps.

    The PyTorch side stores its recurrent state in the export's format (fp32, or int8 with per-row scales),
    so an int8-state graph is compared with PyTorch's int8-state decode. fp32-weight, fp32-state exports of a
    plain fp32 model must agree within ``atol`` (pass a bf16 or quantized model through :func:`fp32_reference`
    first to check its export this way); the others are judged on top-1 agreement.
    """
    spec = runner.spec
    # fp32 weights, fp32 state and a plain fp32 PyTorch model: only float32 rounding separates the two
    exact = spec.weights == "fp32" and spec.state == "fp32" and is_plain_fp32(model)
    atol = (EXACT_ATOL if atol is None else atol) if exact else None
    min_top1 = MIN_TOP1[spec.weights] if min_top1 is None else min_top1
    state = model.new_state(1, fmt=StateQuantConfig(spec.state))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    ref = [model(ids, state)[0].float()]
    torch_tokens: list[int] = []
    for _ in range(steps):
        nxt = int(ref[-1][-1].argmax())
        torch_tokens.append(nxt)
        ref.append(model(torch.tensor([[nxt]], device=model.device), state)[0].float())
    ref_logits = torch.cat(ref).cpu().numpy()                                # [T + steps, V]
    prompt_logits, ostate = runner.prefill(np.array([prompt_ids]), return_all=True)
    onnx_logits = np.concatenate([prompt_logits[0]] + [runner.step(np.array([t]), ostate) for t in torch_tokens])
    diff = np.abs(onnx_logits - ref_logits)
    top1 = float(np.mean(onnx_logits.argmax(-1) == ref_logits.argmax(-1)))
    onnx_tokens = runner.generate(prompt_ids, steps)
    mismatch = next((i for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens, strict=True)) if a != b), None)
    max_diff = float(diff.max())
    passed = (max_diff <= atol and mismatch is None) if atol is not None else top1 >= min_top1
    return VerifyReport(spec.weights, spec.state, len(prompt_ids), steps, max_diff, _locate(diff, len(prompt_ids)),
                        top1, mismatch is None, mismatch, torch_tokens, onnx_tokens, atol, min_top1, passed)
