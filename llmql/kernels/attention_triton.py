"""Triton paged attention: prefill on a cached prefix and batched decode, GQA, sliding
window, soft-capping. Same signature and semantics as `ref_paged_attention`
(`llmql.kernels.attention`), which is its test oracle.

Shapes: q [T, Hq, D], k_cache/v_cache [S, Hkv, D], qo_indptr/kv_indptr [B+1],
kv_indices [N] -> out [T, Hq, D]. One program handles BLOCK_M query rows of one sequence
and one query head, streaming that sequence's keys in BLOCK_N blocks (online softmax).
"""

from __future__ import annotations

import functools

import torch

from llmql.kernels import dot_precision


@functools.cache
def _kernel():
    """Build the jitted kernel on first use (triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_attention_kernel(
        Q, K, V, O, qo_indptr, kv_indptr, kv_indices,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
        scale, softcap, window,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        mblk = tl.program_id(2)
        q_start = tl.load(qo_indptr + b)
        q_len = tl.load(qo_indptr + b + 1) - q_start
        kv_start = tl.load(kv_indptr + b)
        kv_len = tl.load(kv_indptr + b + 1) - kv_start
        if mblk * BLOCK_M < q_len:
            offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            m_mask = offs_m < q_len
            d_mask = offs_d < HEAD_DIM
            q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
            q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            pos = kv_len - q_len + offs_m
            kvh = h // GROUP
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            hi = tl.minimum(kv_len, kv_len - q_len + (mblk + 1) * BLOCK_M)
            lo = 0
            if USE_WINDOW:
                lo = tl.maximum(0, kv_len - q_len + mblk * BLOCK_M - window + 1)
                lo = (lo // BLOCK_N) * BLOCK_N
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_mask = offs_n < kv_len
                slots = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0)
                kv_mask = n_mask[:, None] & d_mask[None, :]
                k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                if USE_SOFTCAP:
                    s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
                visible = (offs_n[None, :] <= pos[:, None]) & n_mask[None, :]
                if USE_WINDOW:
                    visible = visible & ((pos[:, None] - offs_n[None, :]) < window)
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_ptrs = O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    return paged_attention_kernel


def default_blocks(head_dim: int, dtype: torch.dtype, cuda: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64x64 tiles for 16-bit inputs with head_dim <= 128 on CUDA, else
    16x32 (small tiles keep float32 and head_dim 256 inside shared memory)."""
    if cuda and dtype in (torch.bfloat16, torch.float16) and head_dim <= 128:
        return 64, 64
    return 16, 32


def triton_paged_attention(
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
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launcher: checks shapes and strides, then runs the kernel (see the module docstring).

    `block_m`/`block_n` (query rows / keys per tile) default to `default_blocks`.
    """
    import triton

    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert k_cache.shape[2] == d and hq % hkv == 0, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    assert k_cache.stride() == v_cache.stride(), "K and V pools must share a layout"
    assert qo_indptr.numel() == kv_indptr.numel() and qo_indptr.numel() >= 1
    for idx in (qo_indptr, kv_indptr, kv_indices):
        assert idx.dim() == 1 and idx.is_contiguous() and not idx.is_floating_point()
    out = torch.empty_like(q)
    bsz = qo_indptr.numel() - 1
    if t == 0 or bsz == 0:
        return out
    max_q = int((qo_indptr[1:] - qo_indptr[:-1]).max())
    dm, dn = default_blocks(d, q.dtype, q.is_cuda)
    block_m, block_n = block_m or dm, block_n or dn
    grid = (bsz, hq, triton.cdiv(max_q, block_m))
    _kernel()[grid](
        q, k_cache, v_cache, out, qo_indptr, kv_indptr, kv_indices,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m, BLOCK_N=block_n,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window),
        PRECISION=dot_precision(q.dtype),
    )
    return out
