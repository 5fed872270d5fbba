"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from ..activations import PolyCom

__all__ = ["parameter_groups", "build_optimizer", "LRSchedule"]


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: matrices (decayed) and everything else (not decayed).

    Never decayed: PolyCom coefficients (the released trainers exclude all 1-D
    parameters; decaying them would pull PolyNorm towards 0), RMSNorm gains, biases.
    Embedding and LM-head matrices are decayed, like every other matrix (Megatron).
    """
    polycom_params = {id(p) for m in model.modules() if isinstance(m, PolyCom) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() >= 2 and id(param) not in polycom_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, train_config) -> torch.optim.AdamW:
    cfg = train_config
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
    )


class LRSchedule:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.

    ``lr_scale`` multiplies the whole schedule; the divergence guard lowers it after a
    rollback. Its state (``lr_scale``) is part of every checkpoint.
    """

    def __init__(self, train_config):
        self.base_lr = train_config.lr
        self.warmup_steps = train_config.warmup_steps
        self.max_steps = train_config.max_steps
        self.min_lr = train_config.lr * train_config.min_lr_ratio
        self.lr_scale = 1.0

    def lr(self, step: int) -> float:
        """Learning rate for the update that takes the model from ``step`` to ``step + 1``."""
        if self.warmup_steps and step < self.warmup_steps:
            value = self.base_lr * (step + 1) / self.warmup_steps
        else:
            span = max(1, self.max_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            value = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        return value * self.lr_scale

    def state_dict(self) -> Dict:
        return {"lr_scale": self.lr_scale}

    def load_state_dict(self, state: Dict) -> None:
        self.lr_scale = float(state["lr_scale"])
