"""Shared fixtures: where the reference checkpoints live (../shared in CI and dev checkouts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter, for the whole session (it is read when
# the kernels are compiled, so it must be set before any test imports gdn2q.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GDN2Q_SHARED", REPO.parent / "shared"))
FIXTURES = ("tiny", "tiny-hybrid", "small")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (set GDN2Q_SHARED to the shared/ folder)")
    return p


@pytest.fixture
def shared_dir() -> Path:
    return shared_path()


@pytest.fixture
def checkpoint():
    """checkpoint("tiny") -> Path of a reference checkpoint folder."""
    return lambda name: shared_path("checkpoints", name)


@pytest.fixture
def corpus():
    """corpus("shakespeare_eval.txt") -> Path of a corpus text file."""
    return lambda name: shared_path("data", "corpus", name)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty filled with NaN (-1 for integers), so a kernel that leaves an output element unwritten fails."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)
