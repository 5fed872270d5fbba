"""Functional PolyCom ops: ``poly_norm`` and ``poly_relu``.

Both dispatch to the fused autograd path (``polycom.ops.poly_norm`` /
``polycom.ops.poly_relu``), which saves only the input (plus per-row statistics) for
backward. Pass ``fused=False`` to run the released naive formula instead (the reference).

Layout (as released): ``weight`` has shape (r,), ``weight[0]`` multiplies the HIGHEST
power; ``bias`` has shape (1,).
"""

from __future__ import annotations

import torch

from .ops.reference import poly_norm_reference, poly_relu_reference, rms_normalize

__all__ = ["poly_norm", "poly_relu", "poly_norm_reference", "poly_relu_reference", "rms_normalize"]


def poly_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, fused: bool = True) -> torch.Tensor:
    r"""PolyNorm(x) = sum_{k=1..r} weight[r-k] * N(x^k) + bias, N(z) = z / sqrt(mean(z^2, -1) + eps)."""
    if fused:
        from .ops.poly_norm import poly_norm_fused

        return poly_norm_fused(x, weight, bias, eps)
    return poly_norm_reference(x, weight, bias, eps)


def poly_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fused: bool = True) -> torch.Tensor:
    r"""PolyReLU(x) = sum_{k=1..r} weight[r-k] * relu(x)^k + bias."""
    if fused:
        from .ops.poly_relu import poly_relu_fused

        return poly_relu_fused(x, weight, bias)
    return poly_relu_reference(x, weight, bias)
