"""RMSNorm, plain (Llama, Qwen: x * w) or with an offset (Gemma: x * (1 + w))."""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32.

    `offset=1.0` gives Gemma's variant, whose stored weight is w with the scale being 1 + w.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)
