"""Compare a candidate (quantized) model against a base model on the same text.

Both models see the same windows of ``seq_len`` tokens. A model whose decode state is stored quantized
(``model.state_format``) only differs from fp32 on the decode path, so such models are fed through an
explicit :class:`DecodeState` ``stream`` tokens at a time (default 1: token by token, as a server decodes;
the state is stored after every call, so larger steps quantize it less often); otherwise one full forward
per window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gdn2q.data import load_tokenizer, tokenize_file, windows
from gdn2q.errors import CheckpointError, ConfigError
from gdn2q.eval.metrics import AgreementMeter, token_stats

STREAM_CHUNK = 1
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _stores_quantized_state(model: nn.Module) -> bool:
    fmt = getattr(model, "state_format", None)
    return fmt is not None and fmt.dtype != "fp32"


@torch.no_grad()
def window_logits(model: nn.Module, batch: torch.Tensor, stream: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of windows [B, T]: one forward, or ``stream`` tokens at a time through a DecodeState."""
    batch = batch.to(model.device)
    if not stream:
        return model(batch)
    state = model.new_state(batch.shape[0])
    return torch.cat([model(batch[:, t:t + stream], state) for t in range(0, batch.shape[1], stream)], dim=1)


@torch.no_grad()
def compare_many(base: nn.Module, candidates: dict[str, nn.Module], ids: torch.Tensor, seq_len: int,
                 batch_size: int = 4, bucket: int | None = None, stream: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """:func:`compare_models` for several candidates, running the base model once per batch."""
    for name, cand in candidates.items():
        if cand.config.vocab_size != base.config.vocab_size:
            raise ConfigError(f"{name}: vocabulary of {cand.config.vocab_size} tokens, the base model has "
                              f"{base.config.vocab_size}; compare models that share a tokenizer")
    wins = windows(ids, seq_len)
    bucket = bucket or max(seq_len // 8, 1)
    meters = {name: AgreementMeter(bucket) for name in candidates}

    def stream_for(model: nn.Module) -> int | None:
        return stream if stream is not None else (STREAM_CHUNK if _stores_quantized_state(model) else None)

    for start in range(0, wins.shape[0], batch_size):
        batch = wins[start:start + batch_size]
        targets = batch[:, 1:]
        base_logits = window_logits(base, batch, stream_for(base))[:, :-1].float().cpu()
        for name, cand in candidates.items():
            cand_logits = window_logits(cand, batch, stream_for(cand))[:, :-1].float().cpu()
            meters[name].add(token_stats(base_logits, cand_logits, targets))
        if progress:
            progress(min(start + batch_size, wins.shape[0]), wins.shape[0])
    return {name: {**m.result(), "seq_len": seq_len, "windows": wins.shape[0]} for name, m in meters.items()}


def compare_models(base: nn.Module, candidate: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4,
                   bucket: int | None = None, stream: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of both models, KL(base||candidate) mean and 99.9th percentile, top-1 agreement, and the
    same per position bucket (``by_position``: list of {start, end, kl_mean, top1_agreement, ...})."""
    return compare_many(base, {"candidate": candidate}, ids, seq_len, batch_size, bucket, stream,
                        progress)["candidate"]


def default_base(candidate: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """The unquantized source of a quantized model, in the precision it was quantized from."""
    from gdn2q import load_model

    section = getattr(candidate, "quantization", None)
    if section is None:
        raise CheckpointError(f"{candidate.source_path}: not a quantized folder, so it has no source model; "
                              "pass both BASE and CANDIDATE")
    src = Path(section["source"]["path"])
    if not src.exists():
        raise CheckpointError(f"{candidate.source_path}: its source model {src} is gone; pass BASE explicitly")
    return load_model(src, dtype=TORCH_DTYPES.get(section.get("dtype"), torch.float32), device=device)


def eval_ids(model: nn.Module, text: Path, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text`` with the model's tokenizer, at least one window long."""
    return tokenize_file(load_tokenizer(model.tokenizer_path), text, max_tokens=max_tokens, min_tokens=seq_len)
