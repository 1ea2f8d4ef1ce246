"""Mixtral (`block_sparse_moe`: softmax top-k, renormalised) and the shared MoE decoder layer.

Attention is the shared Llama block; the feed-forward is `SparseMoE` under the family's HF
module name (Mixtral `block_sparse_moe`, Qwen3-MoE `mlp`, see qwen3_moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.layers import RMSNorm, SelfAttention
from llmql.engine.layers.moe import SparseMoE, expert_target, stacked_target
from llmql.engine.models.base import CausalLM


class MoEDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + moe(norm(h))."""

    def __init__(self, config: ModelConfig, layer_id: int, moe_name: str) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = SelfAttention(c, layer_id)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.moe_name = moe_name
        self.add_module(moe_name, SparseMoE(c, layer_id))

    @property
    def moe(self) -> SparseMoE:
        """The layer's sparse feed-forward."""
        return self._modules[self.moe_name]  # type: ignore[return-value]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.moe(self.post_attention_layernorm(hidden))


class MoECausalLM(CausalLM):
    """A causal LM of `MoEDecoderLayer`s; expert tensors load into the stacked expert weights."""

    moe_name = "block_sparse_moe"

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return MoEDecoderLayer(config, layer_id, self.moe_name)

    def _target(self, name: str) -> tuple[str, str | int | None]:
        expert = expert_target(name)
        if expert is not None:
            return expert  # type: ignore[return-value]
        stacked = stacked_target(name)
        return (stacked, None) if stacked else super()._target(name)


class MixtralForCausalLM(MoECausalLM):
    """`MixtralForCausalLM` (Mixtral 8x7B, 8x22B and their tiny test cousins)."""
