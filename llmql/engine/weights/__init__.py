"""Checkpoint readers: HF safetensors directories and GGUF files, yielding HF-named tensors."""

from llmql.engine.weights.safetensors import iter_safetensors

__all__ = ["iter_safetensors"]
