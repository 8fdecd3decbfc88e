"""Safe, atomic file access: every read error becomes a one-line CheckpointError naming the file."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gdn2q.errors import CheckpointError, OutputExistsError


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); the file is truncated or "
            "corrupt: copy or download it again") from e
    return tensors, meta


def read_pth(path: Path) -> object:
    """torch.load with weights_only=True: a pickle that needs arbitrary code is refused, never executed."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: needs unsafe unpickling (it stores Python objects, not only tensors); gdn2q loads .pth "
            "files with weights_only=True only: re-save just the state dict (torch.save(sd)) in a trusted "
            "environment") from e
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]}); the file is "
            "truncated, corrupt or not a checkpoint") from e


def _umask_mode(base: int) -> int:
    """mkstemp/mkdtemp create private (0600/0700) paths; give finished outputs the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(path)


@contextlib.contextmanager
def atomic_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; it replaces ``dest`` only if the block finishes."""
    refuse_existing(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(_umask_mode(0o777))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; renamed onto ``dest`` only if the block finishes."""
    refuse_existing(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(_umask_mode(0o666))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
