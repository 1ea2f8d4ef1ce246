"""LoRA delta on CPU: long segments one matmul each (SGMV), short ones batched (BGMV).

Short segments (decode rows): their adapter rows (base rows are skipped) are laid out once
per forward as a padded [G, M] grid: G = the range of pool slots used, M = the most rows
any slot has.
Each (layer, module) then costs a fixed handful of ops, whatever the number of adapters:
gather x into the grid, one bmm with the stacked A (shrink), one bmm per sub-projection
with the stacked B (expand), and one scatter-add into the base output. Padding rows read
row 0 of x and are never written back. Shapes and weight layout as in
`llmql.kernels.lora_shrink` / `lora_expand` (A [S, n_sub*R, K] and B [S, N, R], zero
beyond each slot's rank, so padded ranks add exact zeros).

A slot with many short rows (a popular adapter's decode rows) would set M for every slot,
so its rows skip the grid: gathered, then one matmul per projection (`gathered_lora`).

Long segments (prefill): per segment, a shrink matmul with A trimmed to the slot's rank and
an in-place addmm per sub-projection into `out` (no padding, no gathers, no temporaries of
out's size). `benchmarks/lora_bench.py --cpu-paths` measures the paths on these shapes.

On x86 CPUs with AVX2 or AVX-512 all of that is one call of llmql's C kernel per (layer,
module) (`c_lora_delta`: csrc/lora.c, or its AVX2 build csrc/avx2/lora.c) over every adapter
row of the forward, sorted by slot once per forward (`slot_order`); the paths above are its
torch fallbacks. --cpu-paths (2 threads, medians, 2026-12-04), summed over its 20 cases:
AVX2 build 7.0-7.5 ms, AVX-512 build 5.3, torch paths 16.7 (AVX2 per case: 0.95-1.7x the
AVX-512 build's time, 1-7.7x faster than torch, whose GEMMs on that box use AVX-512).
The CPU pool keeps B rank-major (`b` is a [S, N, R] view of [S, R, N] storage) so that the
kernel's expand reads each rank's output columns contiguously, and only the ranks a slot has.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmql.kernels.cpu_lib import kernel_library


@dataclass(frozen=True)
class PaddedRows:
    """Where each adapter row sits in the [hi - lo, m] grid of slots lo..hi-1."""

    lo: int
    hi: int
    m: int
    src: torch.Tensor  # [(hi-lo)*m] int64: the x row of each grid cell (padding: row 0)
    pos: torch.Tensor  # [n] int64: grid cell of each adapter row, in `rows` order
    rows: torch.Tensor  # [n] int64: x rows that use an adapter, sorted by slot


def padded_rows(rows: torch.Tensor, slots: torch.Tensor) -> PaddedRows | None:
    """The grid of adapter rows `rows` [n] (of x) with pool slots `slots` [n] (> 0)."""
    if rows.numel() == 0:
        return None
    slots, order = torch.sort(slots, stable=True)
    rows = rows[order]
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    counts = torch.bincount(slots - lo, minlength=hi - lo)
    m = int(counts.max())
    starts = counts.cumsum(0) - counts
    rel = slots - lo
    pos = rel * m + torch.arange(rows.numel()) - starts[rel]
    src = torch.zeros((hi - lo) * m, dtype=torch.int64)
    src[pos] = rows
    return PaddedRows(lo, hi, m, src, pos, rows)


def bmm_lora(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
    offsets: Sequence[int], grid: PaddedRows,
) -> torch.Tensor:
    """`out` += each adapter row's delta x @ A[slot]^T @ B[slot]^T (per sub-projection)."""
    stride = b.shape[2]
    g = grid.hi - grid.lo
    xs = x.index_select(0, grid.src).view(g, grid.m, x.shape[1])
    xa = torch.bmm(xs, a[grid.lo : grid.hi].transpose(1, 2))  # [G, M, n_sub*R]
    bt = b[grid.lo : grid.hi]
    parts = [torch.bmm(xa[:, :, i * stride : (i + 1) * stride],
                       bt[:, offsets[i] : offsets[i + 1]].transpose(1, 2))
             for i in range(len(offsets) - 1)]
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.index_add_(0, grid.rows, delta.view(-1, out.shape[1]).index_select(0, grid.pos))


def gathered_lora(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
    offsets: Sequence[int], ranks: Sequence[int], groups: Sequence[tuple[int, torch.Tensor]],
) -> torch.Tensor:
    """`out` += the delta of each (slot, rows [n] int64) group: the slot's rows of x gathered,
    one rank-trimmed shrink matmul, one expand matmul per sub-projection, one scatter-add.
    For a slot with many short-segment rows (a popular adapter's decode rows), which would
    otherwise set the padded grid's height for every slot."""
    stride, k = b.shape[2], x.shape[1]
    n_sub = len(offsets) - 1
    for slot, rows in groups:
        r = ranks[slot]
        if r == 0:
            continue
        a_r = a[slot].view(n_sub, stride, k)[:, :r].reshape(n_sub * r, k)
        xa = x.index_select(0, rows) @ a_r.T
        parts = [xa[:, i * r : (i + 1) * r] @ b[slot, offsets[i] : offsets[i + 1], :r].T
                 for i in range(n_sub)]
        out.index_add_(0, rows, parts[0] if n_sub == 1 else torch.cat(parts, dim=1))
    return out


Segment = tuple[int, int, int]  # (slot, first row, end row)


def segment_lora(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
    offsets: Sequence[int], ranks: Sequence[int], segments: Sequence[Segment],
) -> torch.Tensor:
    """`out` += the delta of each long segment (SGMV): a shrink matmul with the slot's A
    trimmed to its rank, then per sub-projection an in-place addmm into `out`'s block."""
    stride, k = b.shape[2], x.shape[1]
    n_sub = len(offsets) - 1
    for slot, lo, hi in segments:
        r = ranks[slot]
        if r == 0:
            continue
        a_r = a[slot].view(n_sub, stride, k)[:, :r].reshape(n_sub * r, k)
        xa = x[lo:hi] @ a_r.T
        for i in range(n_sub):
            c, d = offsets[i], offsets[i + 1]
            out[lo:hi, c:d].addmm_(xa[:, i * r : (i + 1) * r], b[slot, c:d, :r].T)
    return out


def slot_order(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row pool slots [T] (0: base) -> (rows using an adapter, sorted by slot; their
    slots), int64, as `c_lora_delta` takes them."""
    rows = torch.nonzero(slots > 0).flatten()
    order = torch.sort(slots[rows], stable=True)
    return rows[order.indices].contiguous(), order.values.contiguous()


def c_lora_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, offsets: Sequence[int],
    ranks: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
) -> bool:
    """`out` += the delta of each row in `rows` (sorted by `slots`, from `slot_order`) on
    llmql's kernel (the AVX-512 build, else the AVX2 one: `kernel_library`): the shrink per
    run of up to 24 rows of one slot (register blocks of 6 rows x 4 ranks; AVX2: 3 x 4),
    then the expand per block of output columns over all of the slot's rows. float32 x, a, b, out with unit column strides. `b` [S, N, R] is read rank-major: a
    transposed view of a [S, R, N] tensor (the CPU pool's layout) costs nothing, any other
    layout is copied first. False (nothing written) only when the kernel's scratch memory
    cannot be had."""
    if not (x.dtype == a.dtype == b.dtype == out.dtype == torch.float32):
        raise ValueError("c_lora_delta: float32 x, A, B and out")
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("c_lora_delta: x and out need unit column strides")
    a, bt = a.contiguous(), b.transpose(1, 2).contiguous()
    offs = _offsets(tuple(offsets))
    rc = kernel_library("llmql_lora_delta").llmql_lora_delta(
        x.data_ptr(), x.stride(0), x.shape[1], rows.data_ptr(), slots.data_ptr(), rows.numel(),
        a.data_ptr(), bt.data_ptr(), b.shape[2], b.shape[1], offs.data_ptr(), offs.numel() - 1,
        ranks.to(torch.int64).contiguous().data_ptr(), out.data_ptr(), out.stride(0), torch.get_num_threads())
    return rc == 0


@functools.lru_cache(maxsize=64)
def _offsets(offsets: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int64)
