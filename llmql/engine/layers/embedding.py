"""Token embedding (optionally scaled, as Gemma does) and the LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmql.engine.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    """Embedding lookup; `scale` multiplies the result (Gemma: sqrt(hidden), in the weight dtype)."""

    def __init__(self, vocab_size: int, hidden: int, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
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
        self.weight.weight_loader = default_weight_loader
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = F.linear(hidden, self.weight if weight is None else weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
