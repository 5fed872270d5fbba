"""Feed-forward blocks: the paper's plain FFN and the gated FFN.

- ``plain``: ``down(act(up x))`` = W2 act(W1 x), the paper's placement of PolyReLU /
  PolyNorm (and ReLU, GELU, ReLU^2 baselines).
- ``gated``: ``down(act(gate x) * up x)``: SwiGLU / GeGLU, and gated PolyNorm
  (``down(PolyNorm(gate x) * up x)``, the form a later production model uses).

Matched parameters: a gated FFN has three matrices, a plain one two, so the plain FFN's
intermediate size is 3/2 of the gated one (``ModelConfig.plain_ffn_ratio``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..activations import GatedActivation, get_activation

__all__ = ["FeedForward", "build_activation"]


def build_activation(model_config) -> nn.Module:
    name = model_config.activation
    if name in ("polyrelu", "polynorm"):
        return get_activation(name, order=model_config.polycom_order)
    return get_activation(name)


class FeedForward(nn.Module):
    """One FFN (or one expert). ``activation=None`` means the caller passes a shared one.

    Weight matrices are ``nn.Linear`` without bias: ``up`` and ``down`` (plain), plus
    ``gate`` (gated).
    """

    def __init__(self, d_model: int, hidden_size: int, kind: str, activation: Optional[nn.Module]):
        super().__init__()
        if kind not in ("plain", "gated"):
            raise ValueError(f"FFN kind must be 'plain' or 'gated', got {kind!r}")
        self.kind = kind
        self.hidden_size = hidden_size
        if kind == "gated":
            self.gate = nn.Linear(d_model, hidden_size, bias=False)
        self.up = nn.Linear(d_model, hidden_size, bias=False)
        self.down = nn.Linear(hidden_size, d_model, bias=False)
        self.act = activation

    def forward(self, x: torch.Tensor, activation: Optional[nn.Module] = None) -> torch.Tensor:
        act = self.act if self.act is not None else activation
        if act is None:
            raise RuntimeError("FeedForward built without an activation needs one passed to forward()")
        if self.kind == "plain":
            return self.down(act(self.up(x)))
        if isinstance(act, GatedActivation):
            return self.down(act(self.gate(x), self.up(x)))
        return self.down(act(self.gate(x)) * self.up(x))
