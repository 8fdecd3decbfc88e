"""Text and tokenizer loading shared by calibrate, compare, generate and the exporters."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from gdn2q.errors import DataError

BINARY_SNIFF = 8192


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A ``tokenizers`` tokenizer from a tokenizer.json file (or a checkpoint folder holding one)."""
    if path is None:
        raise DataError("this model has no tokenizer.json beside it; pass --tokenizer PATH/tokenizer.json")
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found; pass --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
        raise DataError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]}); use the model's own file") from e


def read_text(path: str | Path) -> str:
    """UTF-8 text from a file; empty or binary files are refused with a message that says so."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: text file not found; check the path")
    raw = p.read_bytes()
    if b"\x00" in raw[:BINARY_SNIFF]:
        raise DataError(f"{p}: looks binary (NUL bytes), not text; pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    if not text.strip():
        raise DataError(f"{p}: empty text file; pass a file with text in it")
    return text


def tokenize_file(tokenizer: Tokenizer, path: str | Path, max_tokens: int | None = None,
                  min_tokens: int = 1) -> torch.Tensor:
    """Token ids [N] of a text file (at most ``max_tokens``), refusing files shorter than ``min_tokens``."""
    ids = tokenizer.encode(read_text(path)).ids
    if len(ids) < min_tokens:
        raise DataError(f"{path}: only {len(ids)} tokens, need at least {min_tokens}; pass a longer text "
                        "(or lower --seq-len)")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N // seq_len, seq_len] (the tail shorter than seq_len is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"{ids.numel()} tokens is fewer than one window of --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
