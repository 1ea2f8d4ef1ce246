"""Attention over the paged KV pool: prefill on top of a cached prefix, and batched decode.

Shapes:
    q:           [T, Hq, D]   new tokens of all sequences, flattened
    k_cache:     [S, Hkv, D]  one layer's K pool (S slots), already holding the new tokens' K
    v_cache:     [S, Hkv, D]
    qo_indptr:   [B+1]        rows of q per sequence
    kv_indptr:   [B+1]        entries of kv_indices per sequence
    kv_indices:  [N]          pool slots of each sequence's KV in position order
    returns      [T, Hq, D]

Causal: row i of sequence b (q_len rows, kv_len keys) sits at position kv_len - q_len + i and
sees key j iff j <= pos and, with a sliding window W, pos - j < W. Hq must be a multiple of
Hkv (grouped-query attention). `softcap` applies tanh soft-capping to the scores.

`ref_paged_attention` is the torch reference (the test oracle); `paged_attention` picks the
Triton kernels on CUDA (`llmql.kernels.attention_triton` for prefill and mixed batches,
the split-KV `llmql.kernels.decode_attention_triton` when every sequence has one new token)
and the vectorised same-signature CPU path (`llmql.kernels.attention_cpu`) otherwise.
"""

from __future__ import annotations

import torch


def ref_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Torch reference: loops over sequences, dense attention per sequence."""
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    hq, hkv = q.shape[1], k_cache.shape[1]
    assert hq % hkv == 0, f"query heads {hq} not a multiple of kv heads {hkv}"
    out = torch.empty_like(q)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q_b = q[qo[b] : qo[b + 1]]  # [Lq, Hq, D]
        slots = kv_indices[kvp[b] : kvp[b + 1]]
        k_b = k_cache[slots].repeat_interleave(hq // hkv, dim=1)  # [Lk, Hq, D]
        v_b = v_cache[slots].repeat_interleave(hq // hkv, dim=1)
        lq, lk = q_b.shape[0], k_b.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q_b.float(), k_b.float()) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        key = torch.arange(lk, device=q.device)[None, :]
        visible = key <= pos
        if sliding_window:
            visible &= (pos - key) < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[qo[b] : qo[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v_b.float()).to(q.dtype)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_decode: bool = False,
) -> torch.Tensor:
    """Dispatch: the Triton kernels on CUDA, the vectorised torch path elsewhere (same signature).

    `is_decode` promises one new token per sequence (qo_indptr == arange(B+1)); on CUDA it
    selects the split-KV decode kernel.
    """
    if q.is_cuda and is_decode:
        from llmql.kernels.decode_attention_triton import triton_decode_attention

        return triton_decode_attention(
            q, k_cache, v_cache, kv_indptr, kv_indices,
            scale=scale, sliding_window=sliding_window, softcap=softcap,
        )
    if q.is_cuda:
        from llmql.kernels.attention_triton import triton_paged_attention

        return triton_paged_attention(
            q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices,
            scale=scale, sliding_window=sliding_window, softcap=softcap,
        )
    from llmql.kernels.attention_cpu import cpu_paged_attention

    return cpu_paged_attention(
        q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices,
        scale=scale, sliding_window=sliding_window, softcap=softcap,
    )


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new K/V rows ([T, Hkv, D]) into pool slots `loc` ([T])."""
    assert k.shape == v.shape and k.shape[0] == loc.numel() and k.shape[1:] == k_cache.shape[1:]
    k_cache[loc] = k.to(k_cache.dtype)
    v_cache[loc] = v.to(v_cache.dtype)
