"""Fused mixture-of-experts feed-forward: token sorting by expert + grouped GEMM (vLLM/SGLang style).

Shapes (T tokens, H hidden, I expert width, E experts, K experts per token):
    x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I],
    topk_weights [T, K] float, topk_ids [T, K] int  ->  out [T, H]
    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(gate_e x[t]) * up_e x[t]),  e = topk_ids[t, k]

`fused_moe` is the Triton path (CUDA, or CPU under TRITON_INTERPRET=1); `ref_fused_moe` is
the same computation in torch (one matmul per expert group) and the CPU path.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from llmql.kernels import dot_precision


def group_by_expert(topk_ids: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Sort the T*K (token, slot) pairs by expert.

    Returns (order [T*K]: flat pair indices sorted by expert, experts: the experts used in
    ascending order, counts: how many pairs each of them has).
    """
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return order, experts.tolist(), counts.tolist()


def ref_fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of `fused_moe` (same signature): one gated-MLP matmul pair per expert."""
    k = topk_ids.shape[1]
    order, experts, counts = group_by_expert(topk_ids)
    out = torch.zeros_like(x)
    start = 0
    for e, n in zip(experts, counts):
        pairs = order[start:start + n]
        start += n
        tokens = pairs // k
        y = expert_mlp(x[tokens], w13[e], w2[e])
        # NOTE: index_put_ (accumulate), not index_add_: torch's CPU index_add_ takes ms per row.
        y = y * topk_weights.reshape(-1)[pairs, None].to(y.dtype)
        out.index_put_((tokens,), y, accumulate=True)
    return out


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, H], w13 [2I, H], w2 [H, I] -> [N, H] (SwiGLU)."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """vLLM's moe_align_block_size: pairs sorted by expert, each expert's run padded to `block_m`.

    Returns (sorted_ids [P]: flat pair index or T*K for padding, block_expert [P // block_m]:
    the expert of each block, P).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    pad = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(pad, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    total = int(padded.sum())
    sorted_ids = torch.full((total,), pad, dtype=torch.int64, device=flat.device)
    sorted_ids[starts[flat[order]] + rank] = order
    block_expert = torch.repeat_interleave(
        torch.arange(num_experts, device=flat.device), padded // block_m
    )
    return sorted_ids, block_expert, total


@functools.cache
def _kernel():
    """Build the jitted kernel on first use: triton is imported only here, so the CPU path
    never loads it (libtriton alone adds ~65 MiB to the process's RSS)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr,
        num_pairs, n_out, k_in, top_k,
        stride_am, stride_we, stride_wn, stride_om,
        A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[pair] = a[row(pair)] @ w[expert].T (x routing weight) for one block of sorted pairs.
        PRECISION: "ieee" for float32 operands (Triton's default on CUDA, tf32, is ~1e-2 off),
        "tf32" for 16-bit ones (they widen to tf32 exactly); float32 sums either way."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + offs_m)
        valid = pairs < num_pairs
        rows = pairs // top_k if A_PER_TOKEN else pairs
        expert = tl.load(block_expert_ptr + pid_m)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :],
                        mask=valid[:, None] & (kk[None, :] < k_in), other=0.0)
            w = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + kk[:, None],
                        mask=(offs_n[None, :] < n_out) & (kk[:, None] < k_in), other=0.0)
            # NOTE: 16-bit values widen exactly to tf32, so tf32 products are exact for them
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        if MUL_WEIGHT:
            acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < n_out))

    return _moe_gemm_kernel


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    *, block_m: int = 16, block_n: int = 32, block_k: int = 32,
) -> torch.Tensor:
    """Triton fused MoE (see the module docstring for shapes): sorted pairs, two grouped GEMMs."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("fused_moe needs triton")
    t, h = x.shape
    e, two_i, h2 = w13.shape
    k = topk_ids.shape[1]
    assert h2 == h and w2.shape == (e, h, two_i // 2), "w13 [E, 2I, H] and w2 [E, H, I] expected"
    assert topk_weights.shape == topk_ids.shape == (t, k)
    assert x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()
    if t == 0:
        return torch.zeros_like(x)
    sorted_ids, block_expert, total = align_block_size(topk_ids, e, block_m)
    pairs = t * k
    inter = torch.empty(pairs, two_i, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _gemm(x, w13, inter, weights, sorted_ids, block_expert, total, pairs, k, True, False,
          block_m, block_n, block_k)
    gate, up = inter.chunk(2, dim=-1)
    act = (F.silu(gate) * up).contiguous()
    out = torch.empty(pairs, h, dtype=x.dtype, device=x.device)
    _gemm(act, w2, out, weights, sorted_ids, block_expert, total, pairs, k, False, True,
          block_m, block_n, block_k)
    return out.reshape(t, k, h).sum(dim=1)


def _gemm(a, w, out, weights, sorted_ids, block_expert, total, pairs, k, per_token, mul,
          block_m, block_n, block_k) -> None:
    n_out, k_in = w.shape[1], w.shape[2]
    grid = (total // block_m, -(-n_out // block_n))
    _kernel()[grid](
        a, w, out, weights, sorted_ids, block_expert, pairs, n_out, k_in, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_PER_TOKEN=per_token, MUL_WEIGHT=mul,
        PRECISION=dot_precision(a.dtype, w.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
