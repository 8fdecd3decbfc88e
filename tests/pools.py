"""Random stored-state pools for the kernel tests: one pool for the kernel, an identical one for the reference."""

from __future__ import annotations

from dataclasses import replace

import torch

from gdn2q.kernels import new_state_pool
from gdn2q.quant.state import QuantizedState, StateQuantConfig, quantize_state


def pool_pair(fmt: StateQuantConfig, gen: torch.Generator, P: int, HV: int, K: int, V: int,
              device: str) -> list[QuantizedState]:
    """Two identical pools of P random stored states in ``fmt`` (error feedback gets a random residual)."""
    init = quantize_state(torch.randn(P, HV, K, V, generator=gen) * 2, replace(fmt, scales="dynamic"),
                          generator=gen)
    if init.residual is not None:
        init.residual.copy_(torch.randint(-100, 100, init.residual.shape, generator=gen).to(init.residual.dtype))
    pools = []
    for _ in range(2):
        p = new_state_pool(P, HV, K, V, fmt, device)
        for dst, src in ((p.codes, init.codes), (p.scales, init.scales), (p.residual, init.residual)):
            if dst is not None:
                dst.copy_(src)
        pools.append(p)
    return pools
