"""Quantized weights inside the float layers (`Linear` and its packed forms, the embedding,
the LM head).

A layer whose checkpoint tensor arrives as a `QuantWeight` keeps it in a `QuantParts`
(`module.quant`): packed layers (QKV, gate+up) receive one part per shard, possibly of
different GGUF types. `finalize_quantized(model)` stacks neighbouring parts of one layout
into one matmul, ties the LM head to a quantized embedding, and drops the float
placeholders (they become `meta` tensors: shape and dtype only, no memory). The layers'
`forward(x) -> y` signatures do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.weights.quant import QuantWeight, stack_rows
from llmql.kernels.quant_matmul import quant_matmul


class QuantParts:
    """A quantized [N, K] weight as row ranges, each a `QuantWeight`."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.parts: list[tuple[int, QuantWeight]] = []

    def add(self, start: int, weight: QuantWeight) -> None:
        """Set rows [start, start + weight rows) (K must match)."""
        if weight.shape[1] != self.shape[1] or start + weight.shape[0] > self.shape[0]:
            raise ValueError(f"quantized shard {weight.shape} at row {start} does not fit {self.shape}")
        self.parts.append((start, weight))

    def finalize(self) -> None:
        """Sort parts, check they cover every row once, stack runs of one layout."""
        self.parts.sort(key=lambda p: p[0])
        row = 0
        merged: list[tuple[int, list[QuantWeight]]] = []
        for start, w in self.parts:
            if start != row:
                raise ValueError(f"quantized weight {self.shape}: rows {row}..{start} not loaded")
            if merged and merged[-1][1][0].layout() == w.layout():
                merged[-1][1].append(w)
            else:
                merged.append((start, [w]))
            row = start + w.shape[0]
        if row != self.shape[0]:
            raise ValueError(f"quantized weight {self.shape}: only {row} rows loaded")
        self.parts = [(start, ws[0] if len(ws) == 1 else stack_rows(ws)) for start, ws in merged]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for _, w in self.parts)

    def matmul(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N] float32 (or only the output columns `rows`)."""
        if rows is not None:
            return _matmul(x, self._select(rows))
        outs = [_matmul(x, w) for _, w in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantised rows `index` [T] -> float32 [T, K] (embedding lookup)."""
        if len(self.parts) == 1:
            return self.parts[0][1].dequantize(index)
        return self._select(index).dequantize()

    def _select(self, index: torch.Tensor) -> QuantWeight:
        parts = []
        for start, w in self.parts:
            local = index - start
            keep = (local >= 0) & (local < w.shape[0])
            parts.append((keep, w.select_rows(local[keep])))
        if len(parts) == 1:
            return parts[0][1]
        # NOTE: rows from several parts only when layouts differ; keep the caller's order.
        order = torch.cat([torch.nonzero(k).flatten() for k, _ in parts]).argsort()
        return stack_rows([w for _, w in parts]).select_rows(order)


def _matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    return quant_matmul(x, w.qweight, w.scales, w.zeros, bits=w.bits, group=w.group, offset=w.offset)


def load_quant(module: nn.Module, weight: QuantWeight, start: int = 0) -> None:
    """Give `module` (whose `weight` is [N, K]) the rows of `weight` from row `start`."""
    if getattr(module, "quant", None) is None:
        module.quant = QuantParts(tuple(module.weight.shape))  # type: ignore[assignment]
    module.quant.add(start, weight.to(module.weight.device))  # type: ignore[union-attr]


def finalize_quantized(model: nn.Module) -> int:
    """After loading: stack parts, tie the LM head, free float placeholders. Returns the
    number of quantized layers."""
    quantized = [m for m in model.modules() if getattr(m, "quant", None) is not None]
    for module in quantized:
        module.quant.finalize()  # type: ignore[union-attr]
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is not None and head is not None and head.weight is embed.weight and embed.quant is not None:
        head.quant = embed.quant
        quantized.append(head)
    for module in quantized:
        w = module.weight
        module.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
    return len(quantized)


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by quantized weights (each shared weight counted once)."""
    seen = {id(m.quant): m.quant.nbytes for m in model.modules() if getattr(m, "quant", None) is not None}
    return sum(seen.values())
