r"""PolyCom activation modules and the activation registry.

PolyCom of order r with inner function rho (Zhuo et al., ICLR 2025, Eq. 1-2):

    Type I :  f(x) = sum_{i=0..r} a_i * rho(x)^i      (apply rho, then powers)
    Type II:  f(x) = sum_{i=0..r} a_i * rho(x^i)      (powers, then rho)

Parameters follow the released checkpoint layout: ``weight`` of shape (r,) holds
a_r, ..., a_1 (``weight[0]`` multiplies the HIGHEST power) and ``bias`` of shape (1,)
holds a_0. Initialisation as released: weight = 1/r, bias = 0. No 0-d parameters
(FSDP2's ``fully_shard`` rejects them).

The two named members, both r = 3 in the paper:

    PolyReLU(x) = sum_i a_i ReLU(x)^i                        (Type I, rho = ReLU)
    PolyNorm(x) = sum_i a_i N(x^i),  N(z) = z / sqrt(mean(z^2, -1) + eps)   (Type II)

N is an RMS normalisation over the LAST dimension with eps = 1e-6 inside the square
root and no gain. The paper's text says "L2 norm"; the released code uses the mean
(RMS), which is what produced the reported numbers, so we follow the code.
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as PF
from .ops.reference import rms_normalize

__all__ = [
    "PolyCom",
    "PolyReLU",
    "PolyNorm",
    "GatedActivation",
    "ReLU2",
    "get_activation",
    "register_activation",
    "list_activations",
    "is_gated_activation",
    "is_polycom",
]

InnerFn = Union[str, Callable[[torch.Tensor], torch.Tensor]]

_INNER_NAMES = ("relu", "identity", "sigmoid", "silu", "norm")


def _resolve_inner(inner: InnerFn, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(inner):
        return inner
    table = {
        "relu": torch.relu,
        "identity": lambda z: z,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "norm": lambda z: rms_normalize(z, eps),
        "rmsnorm": lambda z: rms_normalize(z, eps),
    }
    if inner not in table:
        raise ValueError(f"unknown PolyCom inner function {inner!r}; known: {', '.join(_INNER_NAMES)} or a callable")
    return table[inner]


class PolyCom(nn.Module):
    r"""Polynomial composition activation of any order and either type.

    Args:
        order: r >= 1, the highest power.
        inner: rho; one of ``relu``, ``identity``, ``sigmoid``, ``silu``, ``norm`` (the
            RMS normalisation N over the last dim), or any callable tensor -> tensor.
        composition: ``"type1"`` (sum a_i rho(x)^i) or ``"type2"`` (sum a_i rho(x^i)).
        eps: epsilon of N.

    ``(inner="relu", composition="type1")`` and ``(inner="norm", composition="type2")``
    run the fused kernels of :class:`PolyReLU` / :class:`PolyNorm`; other combinations
    are evaluated directly with autograd.
    """

    def __init__(self, order: int = 3, inner: InnerFn = "relu", composition: str = "type1", eps: float = 1e-6):
        super().__init__()
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"PolyCom order must be an integer >= 1, got {order!r}")
        if composition not in ("type1", "type2"):
            raise ValueError(f"PolyCom composition must be 'type1' or 'type2', got {composition!r}")
        self.order = order
        self.composition = composition
        self.eps = eps
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")
        self._inner = _resolve_inner(inner, eps)
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1))
        self._fast = None
        if inner == "relu" and composition == "type1":
            self._fast = "relu"
        elif inner in ("norm", "rmsnorm") and composition == "type2":
            self._fast = "norm"

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0 / self.order)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast == "norm":
            return PF.poly_norm(x, self.weight, self.bias, self.eps)
        if self._fast == "relu":
            return PF.poly_relu(x, self.weight, self.bias)
        out = self.bias
        if self.composition == "type1":
            inner = self._inner(x)
            for j in range(self.order):
                out = out + self.weight[j] * inner ** (self.order - j)
        else:
            for j in range(self.order):
                out = out + self.weight[j] * self._inner(x ** (self.order - j))
        return out

    def extra_repr(self) -> str:
        return f"order={self.order}, inner={self.inner_name}, composition={self.composition}"


class PolyReLU(PolyCom):
    r"""PolyReLU(x) = sum_{k=1..r} weight[r-k] * relu(x)^k + bias  (paper: r = 3).

    fp16 range: relu(x)^3 leaves fp16's range (65504) for x > ~40.3, and with the
    default weight 1/3 the output overflows for x > ~58; this is the function's nature
    (the released formula overflows at the same points). Internally the fused path
    computes in fp32, so the result is exact up to the final cast.
    """

    def __init__(self, order: int = 3):
        super().__init__(order=order, inner="relu", composition="type1")


class PolyNorm(PolyCom):
    r"""PolyNorm(x) = sum_{k=1..r} weight[r-k] * N(x^k) + bias,  N(z) = z/sqrt(mean(z^2,-1)+eps).

    Outputs are normalised per row, so bf16/fp16 inputs (computed in fp32 internally)
    give finite outputs and gradients even for |x| ~ 1e3.
    """

    def __init__(self, order: int = 3, eps: float = 1e-6):
        super().__init__(order=order, inner="norm", composition="type2", eps=eps)


class ReLU2(nn.Module):
    """Squared ReLU: relu(x)^2 (Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class GatedActivation(nn.Module):
    """A gated activation: ``act(gate) * up`` (SwiGLU with SiLU, GeGLU with GELU).

    ``forward(gate, up)`` takes the two projections; the FFN applies ``down`` after.
    """

    is_gated = True

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_GATED: set = set()


def register_activation(name: str, factory: Callable[..., nn.Module], gated: bool = False, overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` for :func:`get_activation`.

    Gated activations take ``forward(gate, up)``; set ``gated=True`` for them.
    """
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError("factory must be callable and return an nn.Module")
    _REGISTRY[key] = factory
    if gated:
        _GATED.add(key)
    else:
        _GATED.discard(key)


def list_activations() -> list:
    """Names known to :func:`get_activation`, sorted."""
    return sorted(_REGISTRY)


def is_gated_activation(name: str) -> bool:
    """True for activations that take ``(gate, up)``: swiglu, geglu, ..."""
    return name.lower() in _GATED


def is_polycom(module: nn.Module) -> bool:
    return isinstance(module, PolyCom)


def get_activation(name: str, **kwargs) -> nn.Module:
    """Build a registered activation by name (case-insensitive).

    Known names: relu, gelu, gelu_tanh, silu, relu2, polyrelu, polynorm, polycom,
    swiglu, geglu (gated: ``forward(gate, up)``), identity, plus anything added with
    :func:`register_activation`. Unknown names raise ``ValueError`` listing the known ones.
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(list_activations())}")
    return _REGISTRY[key](**kwargs)


register_activation("relu", lambda: nn.ReLU())
register_activation("gelu", lambda: nn.GELU())
register_activation("gelu_tanh", lambda: nn.GELU(approximate="tanh"))
register_activation("silu", lambda: nn.SiLU())
register_activation("identity", lambda: nn.Identity())
register_activation("relu2", lambda: ReLU2())
register_activation("polyrelu", lambda order=3: PolyReLU(order=order))
register_activation("polynorm", lambda order=3, eps=1e-6: PolyNorm(order=order, eps=eps))
register_activation("polycom", lambda **kw: PolyCom(**kw))
register_activation("swiglu", lambda: GatedActivation(nn.SiLU()), gated=True)
register_activation("geglu", lambda: GatedActivation(nn.GELU()), gated=True)
