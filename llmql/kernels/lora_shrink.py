"""LoRA shrink (S-LoRA / Punica SGMV): y = x @ A[slot]^T per token segment.

Shapes:
    x           [T, K]       input rows of the whole batch
    w           [S, N, K]    stacked A of every pool slot; N = n_sub * R, sub-projection i
                             (e.g. q, k, v) owns rows i*R : i*R + R, its first `rank` valid
    seg_indptr  [G+1] int64  rows of segment g are seg_indptr[g] : seg_indptr[g+1]
    seg_slots   [G]   int64  pool slot of segment g (slot 0 is the base model: rank 0)
    ranks       [S]   int64  rank of each slot (0 = empty / base)
    rank_stride R            padded rank per sub-projection
    returns     [T, N]       x.dtype; zero in columns i*R + j with j >= rank of the row's slot

Prefill uses one segment per request (SGMV); decode passes one segment per row, which is
the BGMV case of the same kernel. `ref_lora_shrink` is the same-signature torch path (the
CPU path and the test oracle): one matmul per distinct slot over that slot's rows.
"""

from __future__ import annotations

import functools

import torch

from llmql.kernels import dot_precision

Groups = list[tuple[int, slice | torch.Tensor]]


def slot_groups(seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> Groups:
    """[(slot, rows)] for every non-base slot: a slice when its rows are contiguous."""
    bounds, slots = seg_indptr.tolist(), seg_slots.tolist()
    rows: dict[int, list[tuple[int, int]]] = {}
    for g, slot in enumerate(slots):
        if slot and bounds[g + 1] > bounds[g]:
            spans = rows.setdefault(slot, [])
            if spans and spans[-1][1] == bounds[g]:
                spans[-1] = (spans[-1][0], bounds[g + 1])
            else:
                spans.append((bounds[g], bounds[g + 1]))
    out: Groups = []
    for slot, spans in rows.items():
        if len(spans) == 1:
            out.append((slot, slice(*spans[0])))
        else:
            out.append((slot, torch.cat([torch.arange(a, b) for a, b in spans]).to(seg_indptr.device)))
    return out


def ref_lora_shrink(
    x: torch.Tensor, w: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
    ranks: torch.Tensor, rank_stride: int, *, groups: Groups | None = None,
) -> torch.Tensor:
    """Torch path (see the module docstring); `groups` may pass precomputed `slot_groups`."""
    n_sub = w.shape[1] // rank_stride
    y = x.new_zeros(x.shape[0], w.shape[1])
    rank_of = ranks.tolist()
    for slot, rows in groups if groups is not None else slot_groups(seg_indptr, seg_slots):
        r = rank_of[slot]
        if r == 0:
            continue
        a = w[slot].view(n_sub, rank_stride, -1)[:, :r].reshape(n_sub * r, -1)
        y.view(-1, n_sub, rank_stride)[rows, :, :r] = (x[rows] @ a.T).view(-1, n_sub, r)
    return y


def lora_shrink(
    x: torch.Tensor, w: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
    ranks: torch.Tensor, rank_stride: int,
) -> torch.Tensor:
    """Triton launcher (same contract as `ref_lora_shrink`)."""
    assert x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[2], (x.shape, w.shape)
    assert w.shape[1] % rank_stride == 0 and seg_indptr.numel() == seg_slots.numel() + 1
    assert x.stride(1) == 1 and w.stride(2) == 1 and ranks.numel() == w.shape[0]
    t, k = x.shape
    n = w.shape[1]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    groups = seg_slots.numel()
    if t == 0 or groups == 0:
        return y.zero_()
    block_n = min(64, max(16, 1 << (n - 1).bit_length()))
    grid = (groups, -(-n // block_n))
    _kernel()[grid](
        x, w, y, seg_indptr, seg_slots, ranks, k, n, rank_stride,
        x.stride(0), w.stride(0), w.stride(1), y.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=64,
        PRECISION=dot_precision(x.dtype),
    )
    return y


@functools.cache
def _kernel():
    """Build the jitted kernel on first use (triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_shrink_kernel(
        X, W, Y, seg_indptr, seg_slots, ranks, K, N, R,
        stride_xt, stride_ws, stride_wn, stride_yt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        g = tl.program_id(0)
        pid_n = tl.program_id(1)
        start = tl.load(seg_indptr + g)
        end = tl.load(seg_indptr + g + 1)
        slot = tl.load(seg_slots + g)
        rank = tl.load(ranks + slot)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        n_valid = n_in & ((offs_n % R) < rank)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                xt = tl.load(X + offs_m[:, None] * stride_xt + offs_k[None, :],
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(W + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None],
                             mask=n_valid[None, :] & k_mask[:, None], other=0.0)
                acc += tl.dot(xt, wt, input_precision=PRECISION)
            tl.store(Y + offs_m[:, None] * stride_yt + offs_n[None, :],
                     acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_in[None, :])

    return lora_shrink_kernel
