"""Programmatic dependent launch (PDL, Hopper sm_90+) for the Triton kernels of the decode step.

Why: a graphed decode step is ~180 short kernels in a chain, and each one pays its launch and the latency of
its first loads after its predecessor has fully finished. A PDL launch lets the next kernel start while its
predecessor still runs: it is scheduled and sets up, then waits for the predecessor at ``gdc_wait``. On an
H200 this took the 1.3B fp8 step at B=64 from 1.514 to 1.479 ms.

Correctness rules for every kernel launched with :func:`launch_options`:

- it may start before its predecessor has finished, so it calls :func:`wait` before it reads anything an
  earlier kernel wrote *and* before its first store (an earlier kernel may still read that buffer, e.g.
  memory the caching allocator handed out again);
- it calls :func:`wait` unconditionally, on every path of every program: ``gdc_wait`` returns only once the
  predecessor has completed, so a kernel that has finished has also waited for everything before it; one
  that skips the wait could finish early and break that ordering for the kernel after it;
- it may call :func:`launch_dependents` as early as it likes (first thing): that only lets the next kernel
  be scheduled, it orders no memory.

A kernel launched normally (cuBLAS, PyTorch, the recurrence kernels) still starts after its predecessor has
completed, so mixing both kinds in one stream is safe.

``ENABLED`` switches PDL for all launches that read it (default: on where Triton supports it; the environment
variable ``GDN2Q_PDL=0`` turns it off); flipping it between CUDA-graph captures (:func:`setting`) is fine,
since the ``PDL`` constexpr and the ``launch_pdl`` option select another compiled kernel. Under the Triton
interpreter it is off and the griddepcontrol instructions are never emitted.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from gdn2q.kernels.state_io import INTERPRETED


def _triton_supports_pdl() -> bool:
    """Triton has the griddepcontrol intrinsics and the ``launch_pdl`` launch option (Triton >= 3.4)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    cuda = getattr(tl.extra, "cuda", None)
    return (hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
            and "launch_pdl" in CUDAOptions.__dataclass_fields__)


SUPPORTED: bool = not INTERPRETED and _triton_supports_pdl()
ENABLED: bool = SUPPORTED and os.environ.get("GDN2Q_PDL", "1") != "0"


@functools.cache
def _hopper_or_later(index: int) -> bool:
    """An NVIDIA GPU of sm_90 or later (ROCm devices also report as "cuda", with their own capabilities)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def active(device: torch.device) -> bool:
    """True when launches on ``device`` use PDL now: enabled, supported, and a CUDA device of sm_90 or later."""
    if not (ENABLED and SUPPORTED and device.type == "cuda"):
        return False
    return _hopper_or_later(torch.cuda.current_device() if device.index is None else device.index)


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keywords for ``kernel[grid](...)`` of a kernel that takes the ``PDL`` constexpr.

    The constexpr and the ``launch_pdl`` option travel together, so a kernel is never launched early without
    its ``gdc_wait`` compiled in.
    """
    return {"PDL": True, "launch_pdl": True} if active(device) else {"PDL": False}


@contextlib.contextmanager
def setting(on: bool) -> Iterator[None]:
    """``ENABLED = on`` inside the block, e.g. to capture the same decode step with and without PDL."""
    global ENABLED
    saved, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = saved


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the preceding kernel has completed and its writes are visible (no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled now (no memory ordering; no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding ``ptrs``: no register is written and nothing waits for it, so a
    kernel can issue it before :func:`wait` for bytes no earlier kernel writes (the fp8 GEMM's weights).
    No library exposes an L2 prefetch to Triton, hence the inline PTX (a no-op under the CPU interpreter)."""
    if not INTERPRETED:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
