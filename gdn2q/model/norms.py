"""RMSNorm and the gated RMSNorm of the GDN-2 output (fp32 math, result in the input dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.weight, self.eps).to(x.dtype)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, activation: str):
    """Per-head RMSNorm of o gated by z: fla-trained weights use sigmoid(z), NVIDIA-trained use z*sigmoid(z)."""
    n = rms_normalize(o, weight, eps)
    zf = z.float()
    gate = torch.sigmoid(zf) if activation == "sigmoid" else F.silu(zf)
    return (n * gate).to(o.dtype)
