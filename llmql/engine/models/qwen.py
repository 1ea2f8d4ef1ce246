"""Qwen2 / Qwen2.5 (bias on q/k/v) and Qwen3 (RMSNorm on q and k): Llama blocks + config flags.

`ModelConfig.from_hf` sets `qkv_bias` for qwen2 and `qk_norm` for qwen3; the shared
`SelfAttention` applies them, so these classes only name the architectures.
"""

from __future__ import annotations

from llmql.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models (`Qwen3ForCausalLM`)."""
