"""Rotary position embeddings (RoPE, Su et al.), rotate-half form as in LLaMA/HF."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        cos, sin = self._table(max_seq_len)
        # Not persistent: recomputed from the config, so checkpoints stay small and exact.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, length: int, device=None):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        t = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, start: int, length: int):
        """cos, sin of shape (length, head_dim) for positions start .. start+length-1."""
        end = start + length
        if end > self.cos.shape[0]:
            raise ValueError(f"sequence position {end} exceeds model.max_seq_len={self.max_seq_len}")
        return self.cos[start:end], self.sin[start:end]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim)."""
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))
