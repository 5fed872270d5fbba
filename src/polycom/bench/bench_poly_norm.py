"""PolyNorm benchmark cases: the released naive formula, the fused path (eager and
compiled), and ``F.rms_norm`` with a gain -- the bandwidth ceiling of a row-normalising op.

Run them with ``polycom bench activations`` (see :mod:`polycom.bench.bench_activations`).
Parameters are in the input's dtype, as in a bf16 model.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ops.poly_norm import poly_norm_fused
from ..ops.reference import poly_norm_reference

__all__ = ["CASES", "build_cases"]

EPS = 1e-6
ORDER = 3

# name -> description; "compiled" cases go through torch.compile(fullgraph=True).
CASES: Dict[str, str] = {
    "polynorm_naive": "released formula, eager autograd (the reference)",
    "polynorm_naive_compiled": "released formula under torch.compile",
    "polynorm_fused": "fused autograd function, eager",
    "polynorm_fused_compiled": "fused autograd function under torch.compile",
    "rms_norm": "F.rms_norm with a gain, eager",
    "rms_norm_compiled": "F.rms_norm with a gain under torch.compile (bandwidth ceiling)",
}


def _compile(function: Callable) -> Callable:
    return torch.compile(function, fullgraph=True, dynamic=False)


def build_cases(x: torch.Tensor, names: Sequence[str]) -> Dict[str, Tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]]:
    """``name -> (forward, leaves)`` for the requested PolyNorm cases on input ``x``."""
    cases = {}
    weight = torch.full((ORDER,), 1.0 / ORDER, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    gain = torch.ones(x.shape[-1], dtype=x.dtype, requires_grad=True)
    width = x.shape[-1]

    def rms_norm(a, g):
        return F.rms_norm(a, (width,), g, EPS)

    functions = {
        "polynorm_naive": (poly_norm_reference, (weight, bias)),
        "polynorm_naive_compiled": (_compile(poly_norm_reference), (weight, bias)),
        "polynorm_fused": (poly_norm_fused, (weight, bias)),
        "polynorm_fused_compiled": (_compile(poly_norm_fused), (weight, bias)),
        "rms_norm": (rms_norm, (gain,)),
        "rms_norm_compiled": (_compile(rms_norm), (gain,)),
    }
    for name in names:
        if name not in functions:
            continue
        function, params = functions[name]
        if name.startswith("polynorm"):
            forward = (lambda f, p: (lambda: f(x, *p, EPS)))(function, params)
        else:
            forward = (lambda f, p: (lambda: f(x, *p)))(function, params)
        cases[name] = (forward, (x,) + tuple(params))
    return cases
