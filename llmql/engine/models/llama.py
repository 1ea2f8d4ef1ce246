"""Llama 2/3 and Mistral (and, through config flags, the Qwen family in qwen.py)."""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.layers import GatedMLP, RMSNorm, SelfAttention
from llmql.engine.models.base import CausalLM


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = SelfAttention(c, layer_id)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias,
                            layer_id=layer_id)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(CausalLM):
    """`LlamaForCausalLM` (Llama 2, Llama 3.x with llama3 RoPE scaling)."""

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return LlamaDecoderLayer(config, layer_id)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with an optional sliding window on every layer (from the config)."""
