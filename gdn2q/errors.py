"""One exception family for everything a user can get wrong.

The CLI catches :class:`GDN2QError` and prints its message as a single line with exit status 2; every
message names the file (and tensor, where there is one) and says how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class GDN2QError(Exception):
    """Base class: bad input, never a bug in gdn2q."""


class CheckpointError(GDN2QError):
    """A checkpoint is missing, unreadable, of an unsupported kind, or its tensors are wrong."""


class ConfigError(GDN2QError):
    """A configuration is invalid or contradicts the tensors it describes."""


class OutputExistsError(GDN2QError):
    """Refusing to overwrite an existing output without ``--force``."""

    def __init__(self, path: str | Path):
        super().__init__(f"{path}: already exists; pass --force to overwrite it or choose another output path")


class DataError(GDN2QError):
    """Input text or data files that cannot be used (empty, binary, too short, wrong model)."""


class UnsupportedError(GDN2QError):
    """A feature this machine, recipe or export cannot run; the message says what can."""
