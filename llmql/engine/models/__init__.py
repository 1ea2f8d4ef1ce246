"""Model families and `load_model`: a model, its config and tokenizer from a name or path.

`LoadedModel.model` contract (every family):
    model(input_ids [T] int64, positions [T] int64) -> hidden [R, hidden_size]
        runs inside `llmql.engine.context.forward_context(batch)`; writes each layer's K/V into
        `batch.kv_pool` at `batch.out_cache_loc`. R = len(batch.logits_indices) when that is
        set (the rows it names, in order), else R = T.
    model.compute_logits(hidden [R, H], rows=None) -> logits [R, vocab] float32 (final soft-capping
        applied), or [R, len(rows)] for the vocabulary entries `rows` only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmql.engine.config import ModelConfig
from llmql.engine.models.registry import get_model_class, supported_architectures
from llmql.engine.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A ready-to-run model (eval mode, no grad needed) with its config and tokenizer."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def load_model(
    source: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: Path | None = None,
    expert_cache_gib: float | None = None,
    expert_prefetch: bool = True,
    quantization: str = "none",
) -> LoadedModel:
    """Load a model.

    Args:
        source: None or "default" (Gemma 3 270M Q4_K_M from the installed package), a `.gguf`
            file, or a HF model directory (config.json, *.safetensors, tokenizer.json).
        dtype: parameter dtype.
        device: "cpu" or "cuda".
        cache_dir: root of the model cache (default: settings' cache_dir); GGUF files are
            dequantised once into `<cache_dir>/models/<name>-<hash>/`.
        expert_cache_gib: MoE models only: None keeps every expert in memory; a number keeps
            the experts in the model files behind an expert cache of that many GiB (0: no cache,
            each expert loaded when used).
        expert_prefetch: with an expert cache, predict and load the next layer's experts early.
        quantization: "none" (float weights), "auto" (a GGUF's quantized tensors stay
            quantized, see `llmql.engine.weights.quant`; other checkpoints keep their
            values), "int8" (per-channel) or "int4" (group-wise) quantization of float
            2-D weights at load.

    Raises:
        FileNotFoundError: `source` does not exist; ValueError: unsupported architecture.
    """
    from llmql.engine.loader import load

    return load(source, dtype=dtype, device=device, cache_dir=cache_dir, quantization=quantization,
                expert_cache_gib=expert_cache_gib, expert_prefetch=expert_prefetch)


__all__ = ["LoadedModel", "get_model_class", "load_model", "supported_architectures"]
