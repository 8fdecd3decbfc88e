"""Import torchao and bitsandbytes once, without their import-time warnings about optional GPU extensions."""

from __future__ import annotations

import contextlib
import functools
import logging
from importlib.metadata import PackageNotFoundError, version

NOISY_LOGGERS = ("torchao", "bitsandbytes")
PYTREE_LOGGER = "torch.utils._pytree"  # torchao registers enums it deprecates, warning at first use


@functools.cache
def quant_libs() -> None:
    # bitsandbytes logs on every int8 matmul that it casts inputs to fp16 (its int8 path always does that)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "inputs will be cast" not in record.getMessage())
    logging.getLogger(PYTREE_LOGGER).setLevel(logging.ERROR)
    saved = {n: logging.getLogger(n).level for n in NOISY_LOGGERS}
    for n in NOISY_LOGGERS:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401

        with contextlib.suppress(ImportError):  # only the bnb-* recipes need it
            import bitsandbytes  # noqa: F401
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchao", "bitsandbytes", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
