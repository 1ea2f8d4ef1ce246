"""Linear layers with per-parameter `weight_loader`s (nano-vllm style).

A checkpoint tensor reaches its parameter through `param.weight_loader(param, tensor[, shard])`;
packed layers (QKV, gate+up) take a shard id naming which slice the tensor fills.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.quant_linear import QuantParts, load_quant
from llmql.engine.weights.quant import QuantWeight
from llmql.kernels.linear import cpu_packed_linear, onednn_available, pack_linear_weight


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a whole tensor into `param` (shapes must match; dtype/device converted)."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), weights as in HF: [out, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | QuantWeight) -> None:
        if isinstance(loaded, QuantWeight):
            load_quant(self, loaded)
            return
        default_weight_loader(param, loaded)

    packed: torch.Tensor | None = None  # oneDNN-packed weight (CPU float32), set by `pack()`
    quant: QuantParts | None = None  # quantized weight (layers/quant_linear.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            y = self.quant.matmul(x).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return cpu_packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        """Use the oneDNN GEMM on a pre-packed weight (CPU float32 only); True if it does.

        NOTE: the packed copy is taken from the loaded weight; call after loading.
        """
        w = self.weight
        if self.quant is not None or w.dtype != torch.float32 or w.is_cuda or not onednn_available():
            return False
        if self.packed is None:
            self.packed = pack_linear_weight(w)
        return True


def pack_linears(model: nn.Module, *, release: bool = True) -> int:
    """`pack()` every `Linear` of `model`; returns how many run on the packed path.

    With `release`, a packed layer's float weight is freed (a meta tensor of its shape stays,
    as for quantized layers), unless another parameter shares its storage (tied embeddings):
    otherwise every packed weight is held twice.
    """
    shared = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False) if not p.is_meta)
    packed = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.pack():
            packed += 1
            if release and not m.weight.is_meta and shared[m.weight.data_ptr()] == 1:
                w = m.weight
                m.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
    return packed


class MergedLinear(Linear):
    """Several linears sharing an input, stacked on the output dim (e.g. gate+up).

    Shard id `i` fills rows of output `i`.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = list(out_sizes)
        super().__init__(in_features, sum(out_sizes), bias)

    def shard_rows(self, shard: int | str) -> tuple[int, int]:
        """(start, size) of a shard's rows."""
        index = int(shard)
        return sum(self.out_sizes[:index]), self.out_sizes[index]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | QuantWeight, shard: int | str | None = None
    ) -> None:
        if shard is None:
            super().weight_loader(param, loaded)
            return
        start, size = self.shard_rows(shard)
        if isinstance(loaded, QuantWeight):
            load_quant(self, loaded, start)
            return
        default_weight_loader(param.data.narrow(0, start, size), loaded)


class QKVLinear(MergedLinear):
    """Q, K and V projections in one matmul; shard ids "q", "k", "v"."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden, sizes, bias)

    def shard_rows(self, shard: int | str) -> tuple[int, int]:
        return super().shard_rows({"q": 0, "k": 1, "v": 2}.get(shard, shard))  # type: ignore[arg-type]
