"""The adapter pool (S-LoRA): adapters in host memory (LRU) and batch slots on the device.

Host: up to `max_loaded_loras` validated adapters, least recently used evicted first, never
one a request in flight uses. Device: `max_loras_per_batch` slots (plus slot 0, the base
model, always zero) of stacked, rank-padded weights per (layer, packed module), which the
shrink/expand kernels index by slot. Slots are keyed by content fingerprint, so replacing an
adapter's files under the same name loads the new weights into a fresh slot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmql.engine.config import ModelConfig
from llmql.engine.lora.adapter import (
    TARGETS,
    AdapterError,
    LoraAdapter,
    load_adapter,
    projection_shape,
    resolve_adapter,
)
from llmql.engine.lora.adapter import fingerprint as content_fingerprint
from llmql.settings import get_settings

# NOTE: our packed module -> its HF sub-projections, in output order.
MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
}


@dataclass
class SlotWeights:
    """One (layer, module)'s adapters, stacked by slot (see llmql.kernels.lora_shrink).

    a [S, n_sub*R, in], b [S, out, R], ranks [S] int64 (and as a host list, `rank_list`, for
    the CPU path), offsets: output column offsets. On CPU `b` is a transposed view of
    [S, R, out] storage (rank-major, as llmql's C kernel reads it; torch's paths take either).
    """

    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor
    offsets: tuple[int, ...]
    rank_list: list[int]

    @property
    def rank_stride(self) -> int:
        return self.b.shape[2]


class AdapterPool:
    """Host LRU of adapters plus device batch slots (slot 0 = base model)."""

    def __init__(
        self, config: ModelConfig, *, max_loras_per_batch: int = 8, max_loaded_loras: int = 32,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        adapters_dir: Path | None = None,  # None: LLMQL_ADAPTERS (settings) at each lookup
    ) -> None:
        if max_loras_per_batch <= 0 or max_loaded_loras < max_loras_per_batch:
            raise ValueError("need 0 < max_loras_per_batch <= max_loaded_loras")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.max_loras_per_batch, self.max_loaded_loras = max_loras_per_batch, max_loaded_loras
        self.adapters_dir = adapters_dir
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()  # by fingerprint
        self.slots: list[str | None] = [None] * (max_loras_per_batch + 1)  # fingerprints
        self._slot_use = [0] * len(self.slots)
        self._clock = 0
        self.weights: dict[tuple[int, str], SlotWeights] = {}
        self.loads = self.slot_loads = 0
        # NOTE: callers resolve adapters on their own threads while the engine thread activates.
        self._lock = threading.RLock()

    def get(self, name: str, busy: Collection[str] = ()) -> LoraAdapter:
        """The validated adapter `name` (loaded from disk unless cached with the same content).

        `busy`: fingerprints of adapters in flight, never evicted from host memory.
        Raises:
            AdapterError: see `llmql.engine.lora.adapter.load_adapter`.
        """
        with self._lock:
            return self._get(name, busy)

    def _get(self, name: str, busy: Collection[str]) -> LoraAdapter:
        adapters_dir = self.adapters_dir or get_settings().adapters
        path = resolve_adapter(name, adapters_dir)
        key = content_fingerprint(path)
        if key not in self.host:
            adapter = load_adapter(name, self.config, adapters_dir)
            self.host[adapter.fingerprint] = adapter
            self.loads += 1
            key = adapter.fingerprint
        self.host.move_to_end(key)
        self._evict_host(set(busy) | {key})
        return self.host[key]

    def activate(self, adapters: Sequence[LoraAdapter | None]) -> list[int]:
        """Put every adapter of a batch in a device slot; returns each entry's slot (0: base).

        Raises:
            AdapterError: more distinct adapters than `max_loras_per_batch`.
        """
        with self._lock:
            return self._activate(adapters)

    def _activate(self, adapters: Sequence[LoraAdapter | None]) -> list[int]:
        wanted = list(dict.fromkeys(a.fingerprint for a in adapters if a is not None))
        if len(wanted) > self.max_loras_per_batch:
            raise AdapterError(f"{len(wanted)} adapters in one batch; max_loras_per_batch is "
                               f"{self.max_loras_per_batch}")
        self._clock += 1
        by_key = {a.fingerprint: a for a in adapters if a is not None}
        slot_of = {}
        for key in wanted:
            slot = self.slots.index(key) if key in self.slots else self._free_slot(set(wanted))
            if self.slots[slot] != key:
                self._write_slot(slot, by_key[key])
            self._slot_use[slot] = self._clock
            slot_of[key] = slot
        self._evict_host(set(wanted))
        return [0 if a is None else slot_of[a.fingerprint] for a in adapters]

    def stats(self) -> dict[str, int]:
        return {"adapters_loaded": len(self.host), "adapter_loads": self.loads,
                "adapter_slot_loads": self.slot_loads}

    # -- helpers ------------------------------------------------------------------------
    def _evict_host(self, keep: set[str]) -> None:
        for key in list(self.host):
            if len(self.host) <= self.max_loaded_loras:
                return
            if key not in keep and key not in self.slots:
                del self.host[key]

    def _free_slot(self, needed: set[str]) -> int:
        """An empty slot, else the least recently used one this batch does not need."""
        free = [s for s in range(1, len(self.slots)) if self.slots[s] is None]
        if free:
            return free[0]
        victims = [s for s in range(1, len(self.slots)) if self.slots[s] not in needed]
        return min(victims, key=lambda s: self._slot_use[s])

    def _write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter`'s weights into `slot` of every (layer, module) buffer."""
        if adapter.rank > self._rank_stride():
            self._regrow(adapter.rank)
        for w in self.weights.values():
            w.a[slot].zero_()
            w.b[slot].zero_()
            w.ranks[slot] = w.rank_list[slot] = 0
        for (layer, target), (a, b) in adapter.weights.items():
            module, sub = TARGETS[target]
            w = self._buffer(layer, module, adapter.rank)
            stride, r = w.rank_stride, a.shape[0]
            w.a[slot, sub * stride : sub * stride + r] = a.to(self.device, self.dtype)
            w.b[slot, w.offsets[sub] : w.offsets[sub + 1], :r] = b.to(self.device, self.dtype)
            w.rank_list[slot] = max(w.rank_list[slot], r)
            w.ranks[slot] = w.rank_list[slot]
        self.slots[slot] = adapter.fingerprint
        self.slot_loads += 1

    def _rank_stride(self) -> int:
        return max((w.rank_stride for w in self.weights.values()), default=0)

    def _buffer(self, layer: int, module: str, rank: int) -> SlotWeights:
        if (layer, module) not in self.weights:
            self.weights[(layer, module)] = self._new_buffer(module, max(rank, self._rank_stride()))
        return self.weights[(layer, module)]

    def _new_buffer(self, module: str, stride: int) -> SlotWeights:
        shapes = [projection_shape(t, self.config) for t in MODULES[module]]
        offsets = [0]
        for out, _ in shapes:
            offsets.append(offsets[-1] + out)
        n, k = len(self.slots), shapes[0][1]
        kw = dict(device=self.device, dtype=self.dtype)
        if self.device.type == "cpu":  # NOTE: B rank-major for the C kernel (`b` a view)
            b = torch.zeros(n, stride, offsets[-1], **kw).transpose(1, 2)
        else:
            b = torch.zeros(n, offsets[-1], stride, **kw)
        return SlotWeights(torch.zeros(n, len(shapes) * stride, k, **kw), b,
                           torch.zeros(n, dtype=torch.int64, device=self.device), tuple(offsets),
                           [0] * n)

    def _regrow(self, stride: int) -> None:
        """Re-pad every buffer to rank stride `stride`, keeping the slots' contents."""
        for key, old in self.weights.items():
            new = self._new_buffer(key[1], stride)
            n_sub, s0 = len(old.offsets) - 1, old.rank_stride
            new.a.view(len(self.slots), n_sub, stride, -1)[:, :, :s0] = \
                old.a.view(len(self.slots), n_sub, s0, -1)
            new.b[:, :, :s0] = old.b
            new.ranks.copy_(old.ranks)
            new.rank_list[:] = old.rank_list
            self.weights[key] = new
