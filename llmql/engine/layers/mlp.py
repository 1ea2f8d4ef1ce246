"""Gated MLP: down(act(gate(x)) * up(x)) with gate and up packed in one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.linear import Linear, MergedLinear
from llmql.engine.lora.batch import add_lora
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.cpu_ops import gated_act

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
_KERNEL_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}  # cpu_ops


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
        self.kernel_act = _KERNEL_ACTS.get(act)
        self.intermediate = intermediate
        self.layer_id = layer_id  # NOTE: keys this layer's LoRA weights (-1: none)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = add_lora(self.gate_up_proj(x), x, self.layer_id, "gate_up")
        if (self.kernel_act and gate_up.dtype == torch.float32 and gate_up.is_cpu
                and kernel_available("llmql_gated_act")):
            h = gated_act(gate_up, self.kernel_act)  # NOTE: one pass (kernels/cpu_ops.py)
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            h = self.act(gate) * up
        return add_lora(self.down_proj(h), h, self.layer_id, "down")
