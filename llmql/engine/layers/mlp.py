"""Gated MLP: down(act(gate(x)) * up(x)) with gate and up packed in one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.linear import Linear, MergedLinear

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """The SwiGLU / GeGLU feed-forward block."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported ({sorted(_ACTIVATIONS)})")
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act = _ACTIVATIONS[act]
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
