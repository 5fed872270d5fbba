"""Mixture-of-experts FFN: top-k router, load-balancing loss and router z-loss.

Routing (OLMoE, the paper's MoE base): router logits in fp32, softmax over experts,
top-k experts per token weighted by their probabilities (not renormalised unless
``moe_normalize_top_k``). Auxiliary losses, both added to the LM loss by the model:

- load balancing (Switch/OLMoE): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the
  N*k assignments that go to expert e and ``P_e`` the mean router probability of e;
  equals 1 for a perfectly uniform router.
- router z-loss (ST-MoE): ``mean_tokens(logsumexp(logits)^2)``; keeps logits small.

Experts run without a Python loop over tokens: assignments are sorted by expert, each
expert processes its contiguous slice in one call (a loop over experts only), and the
weighted outputs are scattered back with ``index_add_``.

PolyCom coefficients: ``shared`` (default, as released: one set per layer used by all
experts) or ``per_expert``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import FeedForward, build_activation

__all__ = ["MoEFeedForward"]


class MoEFeedForward(nn.Module):
    def __init__(self, model_config):
        super().__init__()
        cfg = model_config
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.normalize_top_k = cfg.moe_normalize_top_k
        self.load_balance_weight = cfg.moe_load_balance_weight
        self.z_loss_weight = cfg.moe_z_loss_weight
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        shared = cfg.moe_polycom_coeffs == "shared"
        # Parameter-free activations (SiLU, ...) are shared too: nothing to learn per expert.
        self.activation: Optional[nn.Module] = build_activation(cfg) if shared else None
        self.experts = nn.ModuleList(
            FeedForward(cfg.d_model, cfg.intermediate_size, cfg.ffn_kind, None if shared else build_activation(cfg))
            for _ in range(cfg.n_experts)
        )
        self.last_expert_counts: Optional[torch.Tensor] = None  # tokens per expert, last forward
        self.last_load_balance_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None

    def route(self, x_flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (top-k weights (N,k), top-k expert ids (N,k), load-balancing loss, z-loss)."""
        logits = self.router(x_flat).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        n_assign = experts.numel()
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
        fraction = counts.to(probs.dtype) / n_assign
        load_balance = self.n_experts * torch.sum(fraction * probs.mean(dim=0))
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return weights, experts, load_balance, z_loss

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model) -> (output of the same shape, weighted auxiliary loss)."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        n_tokens = x_flat.shape[0]
        weights, experts, load_balance, z_loss = self.route(x_flat)

        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)[order]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        sorted_inputs = x_flat.index_select(0, token_of)
        sorted_weights = weights.reshape(-1)[order].unsqueeze(-1)

        outputs = []
        for expert, chunk in zip(self.experts, torch.split(sorted_inputs, counts.tolist(), dim=0)):
            if chunk.shape[0]:
                outputs.append(expert(chunk, self.activation))
        expert_out = torch.cat(outputs, dim=0) if outputs else sorted_inputs.new_zeros((0, shape[-1]))
        weighted = expert_out * sorted_weights.to(expert_out.dtype)
        out = weighted.new_zeros((n_tokens, shape[-1])).index_add_(0, token_of, weighted)

        self.last_expert_counts = counts.detach()
        self.last_load_balance_loss = load_balance.detach()
        self.last_z_loss = z_loss.detach()
        aux = self.load_balance_weight * load_balance + self.z_loss_weight * z_loss
        return out.reshape(shape), aux
