"""Per-forward LoRA state and the delta the attention/MLP modules add next to `base(x)`.

The runner puts a `LoraBatch` in the forward context (`ForwardBatch.lora`) when any request
of the batch uses an adapter; `add_lora(out, x, layer_id, module)` then adds each token's
adapter delta to a base projection's output: shrink (x @ A^T) then expand (@ B^T), per token
segment of one slot. Prefill requests are one segment each (SGMV); decode rows are one row
each (BGMV). CUDA runs the Triton kernels, CPU the torch path (one matmul per adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmql.engine.lora.pool import AdapterPool
from llmql.kernels.lora_expand import lora_expand, ref_lora_expand
from llmql.kernels.lora_shrink import Groups, lora_shrink, ref_lora_shrink, slot_groups


@dataclass
class LoraBatch:
    """Token segments of one forward and the slot each uses (0 = base model)."""

    pool: AdapterPool
    seg_indptr: torch.Tensor  # [G+1] int64
    seg_slots: torch.Tensor  # [G] int64
    use_triton: bool = False
    groups: Groups = field(default_factory=list)  # CPU path: rows of each slot

    @classmethod
    def build(cls, pool: AdapterPool, lengths: list[int], slots: list[int]) -> LoraBatch:
        """Segments from per-request row counts and slots, merging runs of one slot."""
        bounds, seg_slots = [0], []
        for n, slot in zip(lengths, slots):
            if seg_slots and seg_slots[-1] == slot:
                bounds[-1] += n
            else:
                seg_slots.append(slot)
                bounds.append(bounds[-1] + n)
        dev = pool.device
        indptr = torch.tensor(bounds, dtype=torch.int64)
        seg = torch.tensor(seg_slots, dtype=torch.int64)
        triton = dev.type == "cuda"
        groups = [] if triton else slot_groups(indptr, seg)
        return cls(pool, indptr.to(dev), seg.to(dev), triton, groups)


def add_lora(out: torch.Tensor, x: torch.Tensor, layer_id: int, module: str) -> torch.Tensor:
    """`out` (= base(x), [T, N]) plus each token's adapter delta for (layer, module)."""
    from llmql.engine.context import current_forward_batch

    batch = current_forward_batch()
    lora = batch.lora if batch is not None else None
    if lora is None:
        return out
    w = lora.pool.weights.get((layer_id, module))
    if w is None:
        return out
    if lora.use_triton:
        xa = lora_shrink(x, w.a, lora.seg_indptr, lora.seg_slots, w.ranks, w.rank_stride)
        return lora_expand(xa, w.b, out, lora.seg_indptr, lora.seg_slots, w.ranks, w.offsets)
    if not lora.groups:
        return out
    xa = ref_lora_shrink(x, w.a, lora.seg_indptr, lora.seg_slots, w.ranks, w.rank_stride,
                         groups=lora.groups)
    return ref_lora_expand(xa, w.b, out, lora.seg_indptr, lora.seg_slots, w.ranks, w.offsets,
                           groups=lora.groups)
