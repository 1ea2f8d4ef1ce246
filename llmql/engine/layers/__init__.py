"""Shared layers every model family is built from."""

from llmql.engine.layers.attention import PagedAttention, SelfAttention
from llmql.engine.layers.embedding import LMHead, VocabEmbedding
from llmql.engine.layers.linear import Linear, MergedLinear, QKVLinear, default_weight_loader
from llmql.engine.layers.mlp import GatedMLP
from llmql.engine.layers.norm import RMSNorm
from llmql.engine.layers.rotary import RotaryEmbedding

__all__ = [
    "GatedMLP",
    "LMHead",
    "Linear",
    "MergedLinear",
    "PagedAttention",
    "QKVLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "VocabEmbedding",
    "default_weight_loader",
]
