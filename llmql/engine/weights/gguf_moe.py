"""llama.cpp's mixture-of-experts tensors -> our HF names.

llama.cpp stacks each layer's experts: `blk.N.ffn_gate_exps` / `ffn_up_exps` [E, I, H] and
`ffn_down_exps` [E, H, I] (numpy shape), with the router in `blk.N.ffn_gate_inp` [E, H].
They are split here into the per-expert HF tensors (Mixtral `block_sparse_moe.experts.e.w1`,
Qwen3-MoE `mlp.experts.e.gate_proj`, ...), so the dequantised cache holds one tensor per
expert part and expert offload can map each expert on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from llmql.engine.config import ModelConfig

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_ROUTER = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
# NOTE: model_type -> (MoE module name, names of the gate, up and down parts)
_NAMING = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
           "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def is_moe_tensor(gguf_name: str) -> bool:
    """Whether a GGUF tensor is a stacked expert tensor or a router."""
    return bool(_EXPS.match(gguf_name) or _ROUTER.match(gguf_name))


def moe_tensors(gguf_name: str, weights: np.ndarray, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a router, or one per expert of a stacked expert tensor."""
    if config.model_type not in _NAMING:
        raise KeyError(f"GGUF tensor {gguf_name!r} in a model without experts ({config.model_type})")
    module, parts = _NAMING[config.model_type]
    router = _ROUTER.match(gguf_name)
    if router is not None:
        yield f"model.layers.{router.group(1)}.{module}.gate.weight", torch.from_numpy(weights)
        return
    match = _EXPS.match(gguf_name)
    if match is None:
        raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
    layer, kind = match.groups()
    if weights.ndim != 3 or weights.shape[0] != config.num_experts:
        raise ValueError(f"GGUF tensor {gguf_name!r} has shape {weights.shape}, expected "
                         f"{config.num_experts} stacked experts")
    part = parts[("gate", "up", "down").index(kind)]
    for e in range(weights.shape[0]):
        name = f"model.layers.{layer}.{module}.experts.{e}.{part}.weight"
        yield name, torch.from_numpy(np.ascontiguousarray(weights[e]))
