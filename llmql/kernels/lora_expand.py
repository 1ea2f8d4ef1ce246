"""LoRA expand (S-LoRA / Punica SGMV): out += xa @ B[slot]^T per token segment, in place.

Shapes:
    xa          [T, n_sub*R]   shrink output (`llmql.kernels.lora_shrink`)
    w           [S, N, R]      stacked B of every pool slot (scaling folded in); output
                               columns offsets[i] : offsets[i+1] belong to sub-projection i,
                               which reads xa columns i*R : i*R + rank
    out         [T, N]         the base projection's output; the delta is added in place
    seg_indptr  [G+1] int64, seg_slots [G] int64, ranks [S] int64: as for the shrink
    offsets     n_sub + 1 ints  output column offsets of the sub-projections
    returns     out

Rows of base segments (slot 0, rank 0) are left as they are. Decode passes one segment per
row (BGMV). `ref_lora_expand` is the same-signature torch path (CPU path, test oracle).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from llmql.kernels import dot_precision
from llmql.kernels.lora_shrink import Groups, slot_groups


def ref_lora_expand(
    xa: torch.Tensor, w: torch.Tensor, out: torch.Tensor, seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor, ranks: torch.Tensor, offsets: Sequence[int],
    *, groups: Groups | None = None,
) -> torch.Tensor:
    """Torch path (see the module docstring); `groups` may pass precomputed `slot_groups`."""
    stride = w.shape[2]
    rank_of = ranks.tolist()
    for slot, rows in groups if groups is not None else slot_groups(seg_indptr, seg_slots):
        r = rank_of[slot]
        if r == 0:
            continue
        part = xa[rows]
        for i in range(len(offsets) - 1):
            a, b = offsets[i], offsets[i + 1]
            delta = part[:, i * stride : i * stride + r] @ w[slot, a:b, :r].T
            if isinstance(rows, slice):
                out[rows, a:b] += delta
            else:
                out[:, a:b].index_add_(0, rows, delta)
    return out


def lora_expand(
    xa: torch.Tensor, w: torch.Tensor, out: torch.Tensor, seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor, ranks: torch.Tensor, offsets: Sequence[int],
) -> torch.Tensor:
    """Triton launcher (same contract as `ref_lora_expand`)."""
    n_sub = len(offsets) - 1
    assert xa.dim() == 2 and w.dim() == 3 and out.dim() == 2, (xa.shape, w.shape, out.shape)
    assert xa.shape[1] == n_sub * w.shape[2] and out.shape == (xa.shape[0], w.shape[1])
    assert offsets[0] == 0 and offsets[-1] == w.shape[1] and ranks.numel() == w.shape[0]
    assert xa.stride(1) == 1 and w.stride(2) == 1 and out.stride(1) == 1
    if xa.shape[0] == 0 or seg_slots.numel() == 0:
        return out
    widest = max(offsets[i + 1] - offsets[i] for i in range(n_sub))
    block_n = 64
    off = torch.tensor(list(offsets), dtype=torch.int64, device=out.device)
    grid = (seg_slots.numel(), -(-widest // block_n), n_sub)
    _kernel()[grid](
        xa, w, out, seg_indptr, seg_slots, ranks, off, w.shape[2],
        xa.stride(0), w.stride(0), w.stride(1), out.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=16,
        PRECISION=dot_precision(xa.dtype),
    )
    return out


@functools.cache
def _kernel():
    """Build the jitted kernel on first use (triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_expand_kernel(
        XA, W, OUT, seg_indptr, seg_slots, ranks, offsets, R,
        stride_xt, stride_ws, stride_wn, stride_ot,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        g = tl.program_id(0)
        pid_n = tl.program_id(1)
        sub = tl.program_id(2)
        start = tl.load(seg_indptr + g)
        end = tl.load(seg_indptr + g + 1)
        slot = tl.load(seg_slots + g)
        rank = tl.load(ranks + slot)
        n_lo = tl.load(offsets + sub)
        n_hi = tl.load(offsets + sub + 1)
        offs_n = n_lo + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        if rank > 0:
            for m0 in range(start, end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_mask = offs_m < end
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, rank, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_mask = offs_k < rank
                    a = tl.load(XA + offs_m[:, None] * stride_xt + sub * R + offs_k[None, :],
                                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                    b = tl.load(W + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None],
                                mask=n_mask[None, :] & k_mask[:, None], other=0.0)
                    acc += tl.dot(a, b, input_precision=PRECISION)
                ptrs = OUT + offs_m[:, None] * stride_ot + offs_n[None, :]
                mask = m_mask[:, None] & n_mask[None, :]
                prev = tl.load(ptrs, mask=mask, other=0.0)
                tl.store(ptrs, (prev.to(tl.float32) + acc).to(OUT.dtype.element_ty), mask=mask)

    return lora_expand_kernel
