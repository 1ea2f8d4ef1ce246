"""The forward context: attention metadata for one model forward, scoped by a context manager.

The runner builds a `ForwardBatch` and runs the model inside `forward_context(batch)`;
attention layers read it with `get_forward_batch()`. Nesting is refused.

Layout (flattened batch of B sequences, T new tokens in total):
    sequence b's new tokens are rows qo_indptr[b]:qo_indptr[b+1] of the model input;
    its whole KV (cached prefix first, then the new tokens) lives in the pool slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]], in position order; so the new tokens of b sit
    at positions kv_len_b - q_len_b ... kv_len_b - 1.
    out_cache_loc[t] is the pool slot where row t's K/V are written before attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from llmql.engine.kvcache.pool import KVPool


@dataclass
class ForwardBatch:
    """Attention metadata for one forward (see the module docstring for the layout)."""

    positions: torch.Tensor  # [T] int64
    qo_indptr: torch.Tensor  # [B+1] int64
    kv_indptr: torch.Tensor  # [B+1] int64
    kv_indices: torch.Tensor  # [N] int64 pool slots
    out_cache_loc: torch.Tensor  # [T] int64 pool slots for the new tokens
    kv_pool: KVPool
    is_decode: bool = False  # every sequence has exactly one new token
    logits_indices: torch.Tensor | None = None  # [B'] rows to compute logits for; None = all
    lora: Any = None  # llmql.engine.lora.batch.LoraBatch when a request uses an adapter
    rope_tables: dict = field(default_factory=dict)  # rotary cos/sin of this forward, per table key


_CURRENT: ContextVar[ForwardBatch | None] = ContextVar("llmql_forward_batch", default=None)


@contextlib.contextmanager
def forward_context(batch: ForwardBatch) -> Iterator[ForwardBatch]:
    """Make `batch` the current forward batch; refuses nesting."""
    if _CURRENT.get() is not None:
        raise RuntimeError("forward_context() does not nest: a forward is already running")
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


def current_forward_batch() -> ForwardBatch | None:
    """The batch of the forward in progress, or None outside `forward_context`."""
    return _CURRENT.get()


def get_forward_batch() -> ForwardBatch:
    """The batch of the forward in progress; raises outside `forward_context`."""
    batch = _CURRENT.get()
    if batch is None:
        raise RuntimeError("no forward in progress: run the model inside forward_context(batch)")
    return batch
