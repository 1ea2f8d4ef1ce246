"""The paged KV pool: per-layer K and V buffers indexed by token slot, plus a free list."""

from __future__ import annotations

import mmap

import torch

_LAZY_BYTES = 64 << 20


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zero tensor. A large one on CPU lives in its own anonymous memory map: its pages
    read as zero without being written, so only the pages of slots in use ever become
    resident (a 1 GiB pool costs the RSS of the tokens it holds), and the map is returned
    to the OS when the tensor is freed.

    NOTE: not `torch.empty`: malloc may serve a large block from freed heap memory (its old
    contents, resident already) when earlier allocations left such a block behind."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.finfo(dtype).bits // 8
    if nbytes >= _LAZY_BYTES and torch.device(device).type == "cpu":
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


class KVPool:
    """K/V storage for `num_slots` tokens across `num_layers` layers.

    `k_buffer[layer]` and `v_buffer[layer]` are [num_slots, num_kv_heads, head_dim].
    Slots are allocated and freed individually (token granularity); the radix cache works
    in pages of `page_size` tokens on top of that.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"KV pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k_buffer = list(_zeros(shape, dtype, device).unbind(0))
        self.v_buffer = list(_zeros(shape, dtype, device).unbind(0))
        # NOTE: a stack: freed slots are reused first, so the pages in use stay few
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take `n` free slots (int64 tensor), or None if fewer than `n` are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return torch.tensor(taken[::-1], dtype=torch.int64)

    def free(self, slots: torch.Tensor | list[int]) -> None:
        """Return slots to the free list."""
        values = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        self._free.extend(values)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K+V one token takes across all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
