"""A LLaMA-style decoder-only transformer (the paper's dense and MoE setups).

Pre-norm blocks ``h = h + attn(RMSNorm(h)); h = h + ffn(RMSNorm(h))``, RoPE, causal
``F.scaled_dot_product_attention``, no biases anywhere, optional tied embeddings and
QK-norm (the MoE setup uses it). Init as Megatron (the dense 1B release): every matrix
N(0, init_std), output projections (attention ``wo`` and FFN ``down``) scaled by
1/sqrt(2 n_layers), RMSNorm gains 1, PolyCom coefficients at their released init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import PolyCom
from .ffn import FeedForward, build_activation
from .moe import MoEFeedForward
from .rope import RotaryEmbedding, apply_rotary

__all__ = ["Transformer", "ModelOutput", "Attention", "Block"]

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # weighted MoE load-balancing + z-loss (0 for dense)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # embeddings, then each block's output
    kv_cache: Optional[KVCache] = None
    load_balance_loss: Optional[torch.Tensor] = None  # unweighted, summed over MoE layers
    router_z_loss: Optional[torch.Tensor] = None


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        new_kv = (k, v)
        past_len = k.shape[2] - length
        gqa = self.n_kv_heads != self.n_heads
        if past_len == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=gqa)
        elif length == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a cache: query i sees keys 0 .. past_len + i
            keys = torch.arange(k.shape[2], device=x.device)
            mask = keys[None, :] <= (past_len + torch.arange(length, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.wo(y), new_kv


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe:
            self.ffn = MoEFeedForward(cfg)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.intermediate_size, cfg.ffn_kind, build_activation(cfg))

    def forward(self, x, cos, sin, past=None):
        attn_out, new_kv = self.attn(self.attn_norm(x), cos, sin, past)
        h = x + attn_out
        ffn_out = self.ffn(self.ffn_norm(h))
        aux = None
        if isinstance(ffn_out, tuple):
            ffn_out, aux = ffn_out
        return h + ffn_out, new_kv, aux


class Transformer(nn.Module):
    """``Transformer(model_config)``; ``model_config.vocab_size`` must be set (> 0)."""

    def __init__(self, model_config):
        super().__init__()
        cfg = model_config
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be > 0 to build a model (the trainer sets it from the tokenizer)")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # meta device (shape-only models for counting): nothing to initialise
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(".wo") or name.endswith(".down")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output else std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, PolyCom):
                module.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                output_hidden_states: bool = False, use_cache: bool = False) -> ModelOutput:
        """Logits for ``input_ids`` (batch, seq); loss when ``targets`` are given.

        ``kv_cache``: the cache returned by a previous call (positions continue after it);
        a cache is returned when one was passed or ``use_cache=True``.
        """
        past_len = kv_cache[0][0].shape[2] if kv_cache else 0
        cos, sin = self.rope(past_len, input_ids.shape[1])
        h = self.tok_embeddings(input_ids)
        hidden = [h] if output_hidden_states else None
        want_cache = use_cache or kv_cache is not None
        new_cache: KVCache = []
        aux_total = None
        lb_total = z_total = None
        for i, block in enumerate(self.blocks):
            h, kv, aux = block(h, cos, sin, kv_cache[i] if kv_cache else None)
            if want_cache:
                new_cache.append(kv)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
                lb, z = block.ffn.last_load_balance_loss, block.ffn.last_z_loss
                lb_total = lb if lb_total is None else lb_total + lb
                z_total = z if z_total is None else z_total + z
            if output_hidden_states:
                hidden.append(h)
        logits = self.lm_head(self.norm(h))
        out = ModelOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None,
                          kv_cache=new_cache if want_cache else None, load_balance_loss=lb_total, router_z_loss=z_total)
        if aux_total is None:
            aux_total = logits.new_zeros((), dtype=torch.float32)
        out.aux_loss = aux_total
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            out.loss = out.lm_loss + aux_total
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with a KV cache; returns prompt + generated ids."""
        if input_ids.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {input_ids.shape[1] + max_new_tokens} exceeds model.max_seq_len={self.config.max_seq_len}")
        was_training = self.training
        self.eval()
        out = self(input_ids, use_cache=True)
        tokens = [input_ids]
        next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        for step in range(max_new_tokens):
            tokens.append(next_id)
            if eos_id is not None and bool((next_id == eos_id).all()):
                break
            if step == max_new_tokens - 1:
                break
            out = self(next_id, kv_cache=out.kv_cache)
            next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        self.train(was_training)
        return torch.cat(tokens, dim=1)
