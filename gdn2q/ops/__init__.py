"""The GDN-2 recurrence as plain functions (no modules, no weights).

Every op takes per-head tensors already broadcast to the HV value heads:
q, k, g, b: [B, T, HV, K]; v, w: [B, T, HV, V]; state: [B, HV, K, V] float32 (layout S[k, v]).
``naive.py`` is the token-serial reference everything else (chunked form, Triton kernels, ONNX graphs)
is tested against.
"""

from gdn2q.ops.chunk import chunk_gdn2
from gdn2q.ops.naive import gdn2_step, l2norm, recurrent_gdn2

__all__ = ["chunk_gdn2", "gdn2_step", "l2norm", "recurrent_gdn2"]
