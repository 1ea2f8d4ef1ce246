"""Lazy architecture -> (module, class) registry of the model families."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS: dict[str, tuple[str, str]] = {
    "Gemma3ForCausalLM": ("llmql.engine.models.gemma3", "Gemma3ForCausalLM"),
    "LlamaForCausalLM": ("llmql.engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llmql.engine.models.llama", "MistralForCausalLM"),
    "MixtralForCausalLM": ("llmql.engine.models.mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("llmql.engine.models.qwen", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llmql.engine.models.qwen", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("llmql.engine.models.qwen3_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("llmql.engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    """The architecture names `get_model_class` accepts."""
    return sorted(_MODELS)


def unsupported(arch: str) -> ValueError:
    """The error for an architecture we cannot run (lists the supported ones)."""
    return ValueError(
        f"unsupported model architecture {arch!r}; supported: {', '.join(supported_architectures())}"
    )


def get_model_class(arch: str) -> type[nn.Module]:
    """Import and return the model class for `arch`; ValueError if unknown."""
    if arch not in _MODELS:
        raise unsupported(arch)
    module, cls = _MODELS[arch]
    return getattr(importlib.import_module(module), cls)
