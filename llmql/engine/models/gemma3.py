"""Gemma 3 text (`Gemma3ForCausalLM`, model_type `gemma3_text`), the default model's family.

Differences from Llama, all driven by `ModelConfig`: (1 + w) RMSNorms, four norms per block
(pre/post attention, pre/post MLP), embeddings scaled by sqrt(hidden), GeGLU (gelu-tanh) MLP,
q/k norm, query scale `query_pre_attn_scalar**-0.5`, and a 5:1 pattern of sliding-window
layers (local RoPE theta) to full-attention layers (global theta).
"""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.layers import GatedMLP, RMSNorm, SelfAttention
from llmql.engine.models.base import CausalLM


class Gemma3DecoderLayer(nn.Module):
    """Sandwich-norm block: h + post_norm(attn(pre_norm(h))), same for the MLP."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c = config

        def norm() -> RMSNorm:
            return RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)

        self.input_layernorm = norm()
        self.self_attn = SelfAttention(c, layer_id)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias,
                            layer_id=layer_id)
        self.post_feedforward_layernorm = norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text-only causal LM."""

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return Gemma3DecoderLayer(config, layer_id)
