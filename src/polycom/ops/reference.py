"""The released code's naive formulas, kept as the reference path and the fallback.

These are exactly the formulas of the authors' release (Megatron patch / OLMo fork):

    PolyNorm(x) = w[0]*N(x^3) + w[1]*N(x^2) + w[2]*N(x) + b,
    N(z)        = z * rsqrt(mean(z^2, dim=-1) + eps)        (RMS, no gain)
    PolyReLU(x) = w[0]*relu(x)^3 + w[1]*relu(x)^2 + w[2]*relu(x) + b

generalised to any order r: ``weight[j]`` multiplies power ``r - j`` (highest first).
Autograd through these saves ~6x the input for backward (see ``ops.poly_norm``).
"""

from __future__ import annotations

import torch


def rms_normalize(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """N(z) = z / sqrt(mean(z^2 over the last dim) + eps), no gain (released `_norm`)."""
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


def poly_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Released PolyNorm, any order r = weight.numel(); computed in the input dtype."""
    order = weight.shape[0]
    out = bias
    for j in range(order):
        power = order - j
        # x itself for the first power, as released (x**1 would save a copy for backward)
        out = out + weight[j] * rms_normalize(x if power == 1 else x**power, eps)
    return out


def poly_relu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Released PolyReLU, any order r = weight.numel(); computed in the input dtype."""
    order = weight.shape[0]
    relu = torch.relu(x)
    out = bias
    for j in range(order):
        power = order - j
        out = out + weight[j] * (relu if power == 1 else relu**power)
    return out
