"""Analytic parameter counts and model FLOPs: parameter matching is a function, not README arithmetic."""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["count_parameters", "ffn_parameters", "model_flops_per_token", "activation_parameters"]


def activation_parameters(model_config) -> int:
    """Learnable scalars of one activation instance: r + 1 for PolyCom, else 0."""
    return model_config.polycom_order + 1 if model_config.activation in ("polyrelu", "polynorm") else 0


def ffn_parameters(model_config) -> int:
    """Parameters of one layer's FFN (dense) or MoE block (all experts + router + coefficients)."""
    cfg = model_config
    matrices = (3 if cfg.ffn_kind == "gated" else 2) * cfg.d_model * cfg.intermediate_size
    act = activation_parameters(cfg)
    if not cfg.is_moe:
        return matrices + act
    coeffs = act * (cfg.n_experts if cfg.moe_polycom_coeffs == "per_expert" else 1)
    return cfg.n_experts * matrices + cfg.d_model * cfg.n_experts + coeffs


def count_parameters(model_config, vocab_size: Optional[int] = None) -> Dict[str, int]:
    """Exact parameter counts of ``Transformer(model_config)`` without building it.

    Keys: total, embedding (input), lm_head (0 when tied), attention, ffn (all layers,
    incl. router and PolyCom coefficients), norms, non_embedding (total - embedding -
    lm_head), active (per token: MoE counts top_k experts), active_non_embedding.
    """
    cfg = model_config
    vocab = vocab_size if vocab_size is not None else cfg.vocab_size
    if vocab <= 0:
        raise ValueError("count_parameters needs a vocabulary size: set model.vocab_size or pass vocab_size=")
    d, layers = cfg.d_model, cfg.n_layers
    embedding = vocab * d
    lm_head = 0 if cfg.tie_embeddings else vocab * d
    q_out = cfg.n_heads * cfg.head_dim
    kv_out = cfg.kv_heads * cfg.head_dim
    attention_layer = d * q_out + 2 * d * kv_out + q_out * d + (2 * cfg.head_dim if cfg.qk_norm else 0)
    ffn_layer = ffn_parameters(cfg)
    norms = layers * 2 * d + d
    total = embedding + lm_head + layers * (attention_layer + ffn_layer) + norms
    if cfg.is_moe:
        matrices = (3 if cfg.ffn_kind == "gated" else 2) * d * cfg.intermediate_size
        inactive = layers * (cfg.n_experts - cfg.top_k) * matrices
    else:
        inactive = 0
    non_embedding = total - embedding - lm_head
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": layers * attention_layer,
        "ffn": layers * ffn_layer,
        "ffn_per_layer": ffn_layer,
        "norms": norms,
        "non_embedding": non_embedding,
        "active": total - inactive,
        "active_non_embedding": non_embedding - inactive,
    }


def model_flops_per_token(model_config, seq_len: int, vocab_size: Optional[int] = None) -> int:
    """Training FLOPs per token: 6 N + 12 L d T (PaLM appendix B; nanoGPT/torchtitan).

    N = active parameters excluding the input embedding (a lookup, no FLOPs) but
    including the LM head; the attention term 12 * n_layers * d_model * seq_len counts
    QK^T and AV, forward and backward, without halving for causality. Activation
    element-wise cost is ignored, as usual.
    """
    counts = count_parameters(model_config, vocab_size)
    n = counts["active"] - counts["embedding"]
    if model_config.tie_embeddings:
        n += counts["embedding"]  # the tied matrix is still used as the LM head
    return 6 * n + 12 * model_config.n_layers * model_config.d_model * seq_len
