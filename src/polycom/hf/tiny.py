"""Tiny randomly initialised configs of every family polycom.hf supports (tests, smoke checks)."""

from __future__ import annotations

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if family == "gemma":
        return tf.GemmaConfig(**COMMON, head_dim=8)
    if family == "olmo":
        return tf.OlmoConfig(**COMMON)
    if family == "olmo2":
        return tf.Olmo2Config(**COMMON)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=32, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 decoder_sparse_step=1)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)
    raise KeyError(family)


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "gpt2", "gpt_neox"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
ALL = DENSE + MOE


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
