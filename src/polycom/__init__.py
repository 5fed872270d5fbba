"""polycom: Polynomial Composition activations (PolyReLU, PolyNorm) for transformers.

Quick start::

    import torch
    from polycom import PolyNorm
    act = PolyNorm()                  # order 3, weight = 1/3, bias = 0 (released layout)
    y = act(torch.randn(8, 4096))     # fused forward+backward, saves only x for backward
"""

from .activations import (
    GatedActivation,
    PolyCom,
    PolyNorm,
    PolyReLU,
    ReLU2,
    get_activation,
    is_gated_activation,
    list_activations,
    register_activation,
)

__version__ = "0.1.0"

__all__ = [
    "PolyCom",
    "PolyReLU",
    "PolyNorm",
    "ReLU2",
    "GatedActivation",
    "get_activation",
    "register_activation",
    "list_activations",
    "is_gated_activation",
    "__version__",
]
