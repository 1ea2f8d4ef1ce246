"""Gated MLP: down(act(gate(x)) * up(x)) with gate and up packed in one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.linear import Linear, MergedLinear
from llmql.engine.lora.batch import add_lora

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """The SwiGLU / GeGLU feed-forward block."""

    def __init__(
        self, hidden: int, intermediate: int, act: str, bias: bool = False, layer_id: int = -1
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported ({sorted(_ACTIVATIONS)})")
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act = _ACTIVATIONS[act]
        self.intermediate = intermediate
        self.layer_id = layer_id  # NOTE: keys this layer's LoRA weights (-1: none)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = add_lora(self.gate_up_proj(x), x, self.layer_id, "gate_up")
        gate, up = gate_up.split(self.intermediate, dim=-1)
        h = self.act(gate) * up
        return add_lora(self.down_proj(h), h, self.layer_id, "down")
