"""Per-forward LoRA state and the delta the attention/MLP modules add next to `base(x)`.

The runner puts a `LoraBatch` in the forward context (`ForwardBatch.lora`) when any request
of the batch uses an adapter; `add_lora(out, x, layer_id, module)` then adds each token's
adapter delta to a base projection's output: shrink (x @ A^T) then expand (@ B^T), per token
segment of one slot. CUDA runs the Triton SGMV kernels over all segments. CPU splits the
segments once per forward (`llmql.kernels.lora_cpu`): segments of at least `LONG_SEGMENT`
rows (prefill) get one matmul each, the shorter ones (decode rows, BGMV) one padded bmm
over slots per module, except a slot with `HEAVY_SLOT` or more short rows (a popular
adapter), whose rows are gathered and multiplied apart; base rows are skipped by all.
These CPU ops run on one intra-op thread (`DELTA_THREADS`; measured faster in the engine).
On AVX-512 CPUs all of it is one call of llmql's C kernel per module instead
(`lora_cpu.c_lora_delta`: every adapter row, sorted by slot once per forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmql.engine.lora.pool import AdapterPool
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.lora_cpu import (
    PaddedRows,
    Segment,
    bmm_lora,
    c_lora_delta,
    gathered_lora,
    padded_rows,
    segment_lora,
    slot_order,
)
from llmql.kernels.lora_expand import lora_expand
from llmql.kernels.lora_shrink import lora_shrink

# NOTE: below this many rows a segment joins the padded bmm (measured: lora_bench --cpu-paths)
LONG_SEGMENT = 16
# NOTE: a slot with this many short rows is gathered apart instead of setting the grid's
# height for every slot (Zipf decode steps; measured: lora_bench --cpu-paths)
HEAVY_SLOT = 16
# NOTE: the CPU delta ops (small matmuls, gathers) run on this many intra-op threads (0: the
# caller's). Measured in the engine (lora_bench workload, 128 prompts, 2 threads, A/B
# interleaved in one process): mixed 39.3-39.9 s -> 33.0-33.1 s Zipf, 34.1-35.7 -> 31.1-32.5 s
# uniform; one adapter at a time 42.6 -> 38.5 s / 41.0 -> 35.9 s. Timed alone (--cpu-paths) the ops are faster on 2 threads; in a forward
# their short parallel regions cost more than they save (docs/benchmarks.md, Multi-LoRA).
DELTA_THREADS = 1


@dataclass
class LoraBatch:
    """Token segments of one forward and the slot each uses (0 = base model)."""

    pool: AdapterPool
    seg_indptr: torch.Tensor  # [G+1] int64
    seg_slots: torch.Tensor  # [G] int64
    use_triton: bool = False
    long: list[Segment] = field(default_factory=list)  # CPU: (slot, lo, hi) of long segments
    grid: PaddedRows | None = None  # CPU: the rows of short adapter segments
    gathered: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # CPU: heavy slots
    c_rows: torch.Tensor | None = None  # CPU with llmql's C kernels: adapter rows sorted by slot
    c_slots: torch.Tensor | None = None  # ... and their slots (`lora_cpu.slot_order`)

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
        if dev.type == "cuda":
            return cls(pool, indptr.to(dev), seg.to(dev), use_triton=True)
        long, grid, gathered = cpu_plan(seg_slots, bounds)
        batch = cls(pool, indptr, seg, False, long, grid, gathered)
        if pool.dtype == torch.float32 and kernel_available("llmql_lora_delta"):
            batch.c_rows, batch.c_slots = slot_order(torch.repeat_interleave(seg, indptr.diff()))
        return batch


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
    if lora.c_rows is not None and x.dtype == out.dtype == torch.float32:
        if lora.c_rows.numel() == 0:
            return out
        flat = x if x.stride(-1) == 1 else x.contiguous()
        if c_lora_delta(flat, w.a, w.b, out, w.offsets, w.ranks, lora.c_rows, lora.c_slots):
            return out
    with delta_threads():
        if lora.long:
            segment_lora(x, w.a, w.b, out, w.offsets, w.rank_list, lora.long)
        if lora.grid is not None:
            bmm_lora(x, w.a, w.b, out, w.offsets, lora.grid)
        if lora.gathered:
            gathered_lora(x, w.a, w.b, out, w.offsets, w.rank_list, lora.gathered)
    return out


@contextlib.contextmanager
def delta_threads() -> Iterator[None]:
    """CPU: intra-op threads lowered to `DELTA_THREADS` (0: unchanged) for the delta ops."""
    threads = torch.get_num_threads()
    if not DELTA_THREADS or threads <= DELTA_THREADS:
        yield
        return
    torch.set_num_threads(DELTA_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_plan(
    seg_slots: list[int], bounds: list[int],
) -> tuple[list[Segment], PaddedRows | None, list[tuple[int, torch.Tensor]]]:
    """CPU: (long segments, the padded grid of short rows, the heavy slots' gathered rows)."""
    long, short = [], {}
    for slot, lo, hi in zip(seg_slots, bounds, bounds[1:]):
        if slot == 0 or hi == lo:
            continue
        if hi - lo >= LONG_SEGMENT:
            long.append((slot, lo, hi))
        else:
            short.setdefault(slot, []).extend(range(lo, hi))
    gathered = [(s, torch.tensor(r, dtype=torch.int64)) for s, r in short.items()
                if len(r) >= HEAVY_SLOT]
    light = [(s, r) for s, r in short.items() if len(r) < HEAVY_SLOT]
    grid = padded_rows(torch.tensor([i for _, r in light for i in r], dtype=torch.int64),
                       torch.tensor([s for s, r in light for _ in r], dtype=torch.int64))
    return long, grid, gathered
