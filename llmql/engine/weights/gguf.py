"""GGUF files: metadata, and dequantised tensors renamed to HF names with llama.cpp's
conversions undone (transformers' GGUF loader does the same; the tests compare with it)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmql.engine.config import ModelConfig, RopeScaling
from llmql.engine.weights.gguf_moe import is_moe_tensor, moe_tensors
from llmql.engine.weights.gguf_reader import TensorInfo, read_gguf

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# NOTE: rope_freqs (Llama 3.1 RoPE factors) has no HF parameter; it goes into the config.
_ROPE_FREQS = "rope_freqs.weight"


class GGUFFile:
    """An opened GGUF file: parsed metadata and tensor names (tensor data stays on disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata, self._tensors = read_gguf(path)
        self.tensor_names = {t.name for t in self._tensors}

    def float32_bytes(self) -> int:
        """Bytes of every tensor of the file as float32."""
        return 4 * sum(math.prod(t.shape) for t in self._tensors)

    def linear_float32_bytes(self) -> int:
        """Bytes of the 2-D tensors other than the token embedding / output head, as float32."""
        skip = ("token_embd.weight", "output.weight")
        return 4 * sum(math.prod(t.shape) for t in self._tensors if len(t.shape) == 2 and t.name not in skip)

    def config(self) -> ModelConfig:
        """The model configuration this file's metadata describes."""
        config = ModelConfig.from_gguf(self.metadata, self.tensor_names)
        freqs = next((t for t in self._tensors if t.name == _ROPE_FREQS), None)
        if freqs is None:
            return config
        # NOTE: llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors.
        factors = tuple(float(f) for f in _dequantise(freqs).reshape(-1))
        return dataclasses.replace(config, rope_scaling=RopeScaling("factors", factors=factors))

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) for every tensor, dequantised and un-permuted."""
        for t in self._tensors:
            if t.name == _ROPE_FREQS:
                continue
            weights = _undo_llama_cpp(_dequantise(t), t.name, config)
            if is_moe_tensor(t.name):
                yield from moe_tensors(t.name, weights, config)
                continue
            yield hf_name(t.name, config), torch.from_numpy(weights)


def _dequantise(t: TensorInfo) -> np.ndarray:
    """float32 values of a tensor in numpy/torch shape (a writable copy)."""
    from gguf.quants import dequantize

    return np.array(dequantize(t.data, t.ggml_type), dtype=np.float32).reshape(t.shape)


def hf_name(gguf_name: str, config: ModelConfig) -> str:
    """The HF parameter name of a GGUF tensor; KeyError if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    match = _BLOCK.match(gguf_name)
    if match is None:
        raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
    layer, kind, suffix = match.groups()
    if kind == "ffn_norm":
        # NOTE: Gemma's ffn_norm is the pre-MLP norm; Llama's is the norm after attention.
        ours = "pre_feedforward_layernorm" if config.norm_offset else "post_attention_layernorm"
    elif kind in _LAYER:
        ours = _LAYER[kind]
    else:
        raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{layer}.{ours}.{suffix}"


def _undo_llama_cpp(w: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """Invert llama.cpp's converter: Gemma norms were stored as w + 1; Llama/Mistral Q and K
    rows were permuted from HF's rotate-half layout to interleaved pairs."""
    if config.norm_offset and name.endswith("norm.weight"):
        return w - np.float32(config.norm_offset)
    if config.model_type in ("llama", "mistral", "mixtral") and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
        return _unpermute(w, heads)
    return w


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
