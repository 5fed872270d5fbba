"""FFN modules that conversion puts into Hugging Face models.

- :class:`PlainFFN`: the paper's placement, ``down(act(up(x)))`` (two matrices).
- :class:`PolyComExperts`: a drop-in for transformers 5.x fused MoE experts
  (``forward(hidden_states, top_k_index, top_k_weights)``, weights stored as 3-D tensors
  ``(num_experts, out, in)``), either gated (``gate_up_proj``, same layout as the original,
  so trained weights are reused as they are) or plain (``up_proj``, paper placement), with
  one activation per layer (``shared``, as released) or one per expert (``per_expert``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PlainFFN", "PolyComExperts", "matched_ffn_hidden_size"]


def matched_ffn_hidden_size(hidden_size: int, intermediate_size: int, gated: bool, bias: bool = False) -> int:
    """Intermediate size of a plain two-matrix FFN with the parameter count of the given FFN.

    Gated: 3 matrices (gate, up, down), plain: 2, so without biases the plain FFN is 3/2 as wide
    (paper: SwiGLU 5504 vs 8256 at d_model 2048). With biases, (2H + 1) * I' + H = 3HI + 2I + H.
    """
    if not gated:
        return intermediate_size
    if not bias:
        return int(round(1.5 * intermediate_size))
    original = 3 * hidden_size * intermediate_size + 2 * intermediate_size + hidden_size
    return int(round((original - hidden_size) / (2 * hidden_size + 1)))


class PlainFFN(nn.Module):
    """``down_proj(act_fn(up_proj(x)))``: the paper's FFN(x) = W2 act(W1 x)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, act: nn.Module, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = ffn_hidden_size
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.act_fn = act
        with torch.no_grad():
            for linear in (self.up_proj, self.down_proj):
                linear.weight.normal_(0.0, init_std)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PolyComExperts(nn.Module):
    """MoE experts with a PolyCom activation; same call signature as transformers' experts.

    gated:  expert_e(x) = down_e(act_e(gate_e x) * up_e x), ``gate_up_proj`` (E, 2I, H)
    plain:  expert_e(x) = down_e(act_e(up_e x)),           ``up_proj``      (E, I, H)
    ``act_fn`` is one module (shared coefficients) or an ``nn.ModuleList`` of E modules.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act, gated: bool,
                 gate_up_proj: nn.Parameter | None = None, down_proj: nn.Parameter | None = None,
                 init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gated = gated
        self.per_expert = isinstance(act, nn.ModuleList)
        if self.per_expert and len(act) != num_experts:
            raise ValueError(f"per-expert activations: got {len(act)} modules for {num_experts} experts")
        in_rows = 2 * intermediate_size if gated else intermediate_size
        if gate_up_proj is None:
            gate_up_proj = nn.Parameter(torch.empty(num_experts, in_rows, hidden_size, dtype=dtype, device=device))
            if gate_up_proj.device.type != "meta":
                with torch.no_grad():
                    gate_up_proj.normal_(0.0, init_std)
        if down_proj is None:
            down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device))
            if down_proj.device.type != "meta":
                with torch.no_grad():
                    down_proj.normal_(0.0, init_std)
        if tuple(gate_up_proj.shape) != (num_experts, in_rows, hidden_size):
            raise ValueError(f"expert input weights have shape {tuple(gate_up_proj.shape)}, expected {(num_experts, in_rows, hidden_size)}")
        if gated:
            self.gate_up_proj = gate_up_proj
        else:
            self.up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act

    def input_weight(self, expert: int) -> torch.Tensor:
        return self.gate_up_proj[expert] if self.gated else self.up_proj[expert]

    def activation(self, expert: int) -> nn.Module:
        return self.act_fn[expert] if self.per_expert else self.act_fn

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        projected = F.linear(x, self.input_weight(expert))
        act = self.activation(expert)
        if self.gated:
            gate, up = projected.chunk(2, dim=-1)
            hidden = act(gate) * up
        else:
            hidden = act(projected)
        return F.linear(hidden, self.down_proj[expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for hit in expert_hit:
            expert = int(hit[0])
            if expert == self.num_experts:  # padding slot used by expert parallelism
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            out = self.expert_forward(expert, hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        coeffs = "per_expert" if self.per_expert else "shared"
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {kind}, coefficients={coeffs}"
