"""Token embedding (optionally scaled, as Gemma does) and the LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.linear import default_weight_loader
from llmql.engine.layers.quant_linear import (
    Int8Packed,
    QuantParts,
    load_quant,
    rescored_logits,
    rescored_top,
)
from llmql.engine.weights.gguf_quant import FileQuantWeight
from llmql.engine.weights.quant import QuantWeight


def _loader(module: nn.Module):
    """The weight loader of an embedding / LM head: quantized or float."""

    def load(param: nn.Parameter, loaded: torch.Tensor | QuantWeight | FileQuantWeight) -> None:
        if isinstance(loaded, (QuantWeight, FileQuantWeight)):
            load_quant(module, loaded)
        else:
            default_weight_loader(param, loaded)

    return load


class VocabEmbedding(nn.Module):
    """Embedding lookup; `scale` multiplies the result (Gemma: sqrt(hidden), in the weight dtype)."""

    def __init__(self, vocab_size: int, hidden: int, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.weight.weight_loader = _loader(self)
        self.scale = scale

    quant: QuantParts | None = None  # quantized weight (layers/quant_linear.py)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            h = self.quant.rows(input_ids).to(self.weight.dtype)
        else:
            h = F.embedding(input_ids, self.weight)
        if self.scale is None:
            return h
        # NOTE: the scale is rounded to the weight dtype first, as transformers does.
        return h * float(torch.tensor(self.scale, dtype=self.weight.dtype))


class LMHead(nn.Module):
    """Logits = hidden W^T in float32, with optional final tanh soft-capping."""

    def __init__(self, vocab_size: int, hidden: int, softcap: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.weight.weight_loader = _loader(self)
        self.softcap = softcap

    quant: QuantParts | None = None  # quantized weight (layers/quant_linear.py)
    int8: Int8Packed | None = None  # its int8 copy for full-vocabulary logits (same file)

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> logits [T, vocab] float32, or [T, len(rows)]: only the vocabulary
        entries `rows` (token ids)."""
        if self.quant is not None and self.int8 is not None and rows is None:
            logits = rescored_logits(hidden, self.int8, self.quant)
        elif self.quant is not None:
            logits = self.quant.matmul(hidden, rows)
        else:
            weight = self.weight if rows is None else self.weight[rows]
            logits = F.linear(hidden, weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def top(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """hidden [T, H] -> (values, token ids) [T, RESCORE_TOP] of each row's best tokens,
        exact (soft-capped), without the [T, vocab] logits; None without an int8 head (the
        full logits cost nothing extra there)."""
        if self.quant is None or self.int8 is None:
            return None
        values, ids = rescored_top(hidden, self.int8, self.quant)
        if self.softcap:
            values = torch.tanh(values / self.softcap) * self.softcap
        return values, ids
