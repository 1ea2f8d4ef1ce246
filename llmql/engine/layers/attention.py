"""Attention over the paged KV pool, and the self-attention block built on it."""

from __future__ import annotations

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.context import get_forward_batch
from llmql.engine.layers.linear import Linear, QKVLinear
from llmql.engine.layers.norm import RMSNorm
from llmql.engine.layers.rotary import RotaryEmbedding
from llmql.engine.lora.batch import add_lora
from llmql.kernels.attention import paged_attention, store_kv
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.cpu_ops import norm_rope


class PagedAttention(nn.Module):
    """Writes this layer's new K/V into the pool, then attends over each sequence's KV.

    Reads all metadata from the current `ForwardBatch` (llmql.engine.context).
    """

    def __init__(
        self, layer_id: int, scale: float, sliding_window: int | None, softcap: float | None
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        batch = get_forward_batch()
        k_cache = batch.kv_pool.k_buffer[self.layer_id]
        v_cache = batch.kv_pool.v_buffer[self.layer_id]
        store_kv(k_cache, v_cache, batch.out_cache_loc, k, v)
        return paged_attention(
            q, k_cache, v_cache, batch.qo_indptr, batch.kv_indptr, batch.kv_indices,
            scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
            is_decode=batch.is_decode,
        )


class SelfAttention(nn.Module):
    """QKV projection, optional q/k RMSNorm, RoPE (per-layer theta), paged attention, output."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.layer_id = layer_id
        self.qkv_proj = QKVLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_offset) if c.qk_norm else None
        theta, scaling = c.layer_rope(layer_id)
        self.rotary = RotaryEmbedding(c.head_dim, theta, scaling)
        self.attn = PagedAttention(
            layer_id, c.attn_scale, c.layer_window(layer_id), c.attn_logit_softcapping
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]."""
        t = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = add_lora(self.qkv_proj(hidden), hidden, self.layer_id, "qkv")
        if qkv.dtype == torch.float32 and qkv.is_cpu and kernel_available("llmql_norm_rope"):
            q, k = self._norm_rope(positions, qkv)  # NOTE: one pass per q and k (kernels/cpu_ops.py)
            v = qkv[:, q_size + kv_size :].reshape(t, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.reshape(t, self.num_heads, self.head_dim)
            k = k.reshape(t, self.num_kv_heads, self.head_dim)
            v = v.reshape(t, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v).reshape(t, q_size)
        return add_lora(self.o_proj(out), out, self.layer_id, "o")

    def _norm_rope(self, positions: torch.Tensor, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hkv, D] from a float32 CPU qkv [T, W]: q/k RMSNorm (where the
        model has them) and RoPE by llmql's C kernel, the values of the torch path."""
        cos, sin = self.rotary.tables(positions, torch.float32)
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None and self.k_norm is not None else (None, None)
        q = norm_rope(qkv, 0, self.num_heads, self.head_dim, *_norm_args(norms[0]), cos, sin)
        k = norm_rope(qkv, self.num_heads * self.head_dim, self.num_kv_heads, self.head_dim,
                      *_norm_args(norms[1]), cos, sin)
        return q, k


def _norm_args(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
    return (None, 0.0) if norm is None else (norm.scale(), norm.eps)
