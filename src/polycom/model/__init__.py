"""Model: a LLaMA-style decoder with plain, gated or mixture-of-experts FFNs."""

from .ffn import FeedForward, build_activation
from .moe import MoEFeedForward
from .params import activation_parameters, count_parameters, ffn_parameters, model_flops_per_token
from .transformer import Attention, Block, ModelOutput, Transformer

__all__ = [
    "Transformer",
    "ModelOutput",
    "Attention",
    "Block",
    "FeedForward",
    "MoEFeedForward",
    "build_activation",
    "count_parameters",
    "ffn_parameters",
    "activation_parameters",
    "model_flops_per_token",
]
