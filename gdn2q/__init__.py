"""gdn2q: quantization and edge deployment for Gated DeltaNet-2 language models.

The public names are resolved lazily (module ``__getattr__``) so that torch-free parts of the package, such as
the onnxruntime runner in :mod:`gdn2q.export.runner`, can be imported on a machine without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "gdn2q.checkpoint",
    "read_checkpoint": "gdn2q.checkpoint",
    "AttentionConfig": "gdn2q.config",
    "GDN2Config": "gdn2q.config",
    "GDN2QError": "gdn2q.errors",
}
__all__ = ["AttentionConfig", "GDN2Config", "GDN2QError", "__version__", "load_model", "read_checkpoint"]

if TYPE_CHECKING:
    from gdn2q.checkpoint import load_model, read_checkpoint
    from gdn2q.config import AttentionConfig, GDN2Config
    from gdn2q.errors import GDN2QError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gdn2q' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
