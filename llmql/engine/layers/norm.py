"""RMSNorm, plain (Llama, Qwen: x * w) or with an offset (Gemma: x * (1 + w))."""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.layers.linear import default_weight_loader
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.cpu_ops import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32.

    `offset=1.0` gives Gemma's variant, whose stored weight is w with the scale being 1 + w.
    float32 on CPU: one pass of llmql's C kernel where it runs (kernels/cpu_ops.py).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = self._load
        self._scale: tuple[tuple[int, int], torch.Tensor] | None = None  # NOTE: see `scale`

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded)
        self._scale = None  # NOTE: `param.data.copy_` does not bump the version `scale` keys on

    def scale(self) -> torch.Tensor:
        """What x / rms(x) is multiplied by: the weight, or offset + weight (computed once per
        weight: kept until the weight is loaded again or its storage or version changes)."""
        if not self.offset:
            return self.weight
        w = self.weight
        try:
            key = (w.data_ptr(), w._version)
        except RuntimeError:  # NOTE: inference tensors have no version counter
            return w + self.offset
        if self._scale is None or self._scale[0] != key:
            with torch.no_grad():
                self._scale = (key, w + self.offset)
        return self._scale[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.is_cpu and self.weight.dtype == torch.float32
                and kernel_available("llmql_rms_norm")):
            return rms_norm(x, self.scale(), self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)
