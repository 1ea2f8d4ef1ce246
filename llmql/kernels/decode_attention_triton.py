"""Split-KV decode attention over the paged KV pool (flash-decoding), GQA, sliding window,
soft-capping; with its torch reference `ref_decode_attention`.

Shapes:
    q:           [B, Hq, D]   one new token per sequence, at its last position
    k_cache:     [S, Hkv, D]  one layer's K pool, already holding the new tokens' K
    v_cache:     [S, Hkv, D]
    kv_indptr:   [B+1]        entries of kv_indices per sequence
    kv_indices:  [N]          pool slots of each sequence's KV in position order
    returns      [B, Hq, D]

Row b sits at position kv_len_b - 1 and sees key j iff, with a sliding window W,
kv_len_b - 1 - j < W. A sequence with no keys gives zeros.

Two launches. `_split_kernel`, grid (B, Hkv, splits): one program takes one sequence, one KV
head and one contiguous split of its (windowed) keys, and runs all GROUP = Hq / Hkv query
heads of that KV head as the rows of one tile, so each K/V block is loaded once per KV head
(not once per query head); it writes a partial output and its log-sum-exp per split
(float32). `_reduce_kernel`, grid (B, Hq), merges the splits. Splitting the keys keeps the
GPU busy at small batch sizes, where B * Hkv programs alone would leave most SMs idle.
"""

from __future__ import annotations

import functools

import torch

from llmql.kernels import dot_precision


def ref_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Torch reference (the test oracle): `ref_paged_attention` with one query row per
    sequence (a sequence with no keys gives zeros)."""
    from llmql.kernels.attention import ref_paged_attention

    assert kv_indptr.numel() == q.shape[0] + 1, (kv_indptr.shape, q.shape)
    qo_indptr = torch.arange(q.shape[0] + 1, device=kv_indptr.device)
    return ref_paged_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices,
                               scale=scale, sliding_window=sliding_window, softcap=softcap)


@functools.cache
def _kernels():
    """Build the jitted kernels on first use (triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(
        Q, K, V, MidO, MidLSE, kv_indptr, kv_indices,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
        scale, softcap, window,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_start = tl.load(kv_indptr + b)
        kv_len = tl.load(kv_indptr + b + 1) - kv_start
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(0, kv_len - window)
        per_split = tl.cdiv(tl.cdiv(kv_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        s_lo = lo + split * per_split
        s_hi = tl.minimum(kv_len, s_lo + per_split)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for start_n in range(s_lo, s_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < s_hi
            slots = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_N]
            if USE_SOFTCAP:
                s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # NOTE: every block inside [s_lo, s_hi) holds a visible key, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        mid = b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(MidO + mid[:, None] + offs_d[None, :], out,
                 mask=h_mask[:, None] & d_mask[None, :])
        tl.store(MidLSE + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)

    @triton.jit
    def _reduce_kernel(
        MidO, MidLSE, O, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < NUM_SPLITS
        d_mask = offs_d < HEAD_DIM
        lse = tl.load(MidLSE + b * stride_lb + h * stride_lh + offs_s,
                      mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))
        o = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms
                    + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
                 mask=d_mask)

    return _split_kernel, _reduce_kernel


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head): enough programs for ~2 per SM, at most 16.

    NOTE: chosen from shapes only (no look at the sequence lengths), so it needs no host
    sync and a captured CUDA graph stays valid as sequences grow.
    """
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, batch * num_kv_heads))
    return max(1, min(16, 1 << (want - 1).bit_length()))


def triton_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launcher: checks shapes and strides, then runs both kernels (see the module docstring)."""
    import triton

    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert k_cache.shape[2] == d and hq % hkv == 0, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    assert k_cache.stride() == v_cache.stride(), "K and V pools must share a layout"
    assert kv_indptr.numel() == bsz + 1, (kv_indptr.shape, q.shape)
    for idx in (kv_indptr, kv_indices):
        assert idx.dim() == 1 and idx.is_contiguous() and not idx.is_floating_point()
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    splits = num_splits or default_num_splits(bsz, hkv, q.device)
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    block_n = block_n or (64 if q.is_cuda and block_d <= 128 else 32)
    mid_o = torch.empty(bsz, hq, splits, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(bsz, hq, splits, dtype=torch.float32, device=q.device)
    split_kernel, reduce_kernel = _kernels()
    split_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, mid_o, mid_lse, kv_indptr, kv_indices,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), float(scale), float(softcap or 1.0), int(sliding_window or 0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=splits,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window),
        PRECISION=dot_precision(q.dtype),
    )
    reduce_kernel[(bsz, hq)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return out
