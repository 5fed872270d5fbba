"""PolyReLU benchmark cases: the released naive formula and the fused path (eager and
compiled). Run them with ``polycom bench activations``.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

from ..ops.poly_relu import poly_relu_fused
from ..ops.reference import poly_relu_reference

__all__ = ["CASES", "build_cases"]

ORDER = 3

CASES: Dict[str, str] = {
    "polyrelu_naive": "released formula, eager autograd",
    "polyrelu_fused": "fused autograd function, eager",
    "polyrelu_fused_compiled": "fused autograd function under torch.compile",
}


def build_cases(x: torch.Tensor, names: Sequence[str]) -> Dict[str, Tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]]:
    """``name -> (forward, leaves)`` for the requested PolyReLU cases on input ``x``."""
    weight = torch.full((ORDER,), 1.0 / ORDER, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    functions = {
        "polyrelu_naive": poly_relu_reference,
        "polyrelu_fused": poly_relu_fused,
        "polyrelu_fused_compiled": torch.compile(poly_relu_fused, fullgraph=True, dynamic=False)
        if "polyrelu_fused_compiled" in names
        else None,
    }
    cases = {}
    for name in names:
        function = functions.get(name)
        if function is None:
            continue
        cases[name] = ((lambda f: (lambda: f(x, weight, bias)))(function), (x, weight, bias))
    return cases
