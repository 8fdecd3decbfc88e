"""gdn2q: quantization and edge deployment for Gated DeltaNet-2 language models."""

from gdn2q.checkpoint import load_model, read_checkpoint
from gdn2q.config import AttentionConfig, GDN2Config
from gdn2q.errors import GDN2QError

__version__ = "0.1.0"
__all__ = ["AttentionConfig", "GDN2Config", "GDN2QError", "__version__", "load_model", "read_checkpoint"]
