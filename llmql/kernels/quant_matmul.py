"""Dequantising matmul y = x W^T for group-wise integer weights (`QuantWeight`).

Shapes: x [M, K] float, qweight int8 [N, K] (bits 8) or uint8 [N, K // 2] (bits 4, two
values per byte, low nibble first), scales [N, K // group], zeros [N, K // group] or None
-> y [M, N] float32, with W[n, k] = scales[n, g] * (q[n, k] - offset) + zeros[n, g].

`ref_quant_matmul` is the torch reference and the CPU path: it writes q * scale for
`chunk` output rows at a time into one float32 tile (a per-thread buffer reused across
calls, so the float32 copy of the weight never exists at once and no call allocates it)
and multiplies it; each group's constant (zeros - offset * scale) is added afterwards as a
small GEMM of x's per-group sums (y += sum_g(x) zeros_eff^T, 1/group of the main one), so
the tile costs two vectorised passes (convert, scale). On the AVX2 CPUs this was chosen on
torch's weight-only ops ran slower for every shape measured (`_weight_int8pack_mm`: 75 ms
against 2.2 ms here for a 2048x640 Q5_0 weight at 60 rows, one thread, 21:29 UTC
2026-12-03), and they are per-channel (inexact for GGUF's group scales) or 4-bit only, so
they are not used. With `dtype=torch.bfloat16` the tile is written in bfloat16 and
multiplied by x rounded to bfloat16 (products summed in float32 by the GEMM, the result
rounded to bfloat16, then widened): for CPUs that multiply bfloat16 in hardware (Intel AMX,
`kernels.linear.amx_available`), where the GEMM runs ~4x (60 rows) to ~6x (512 rows) faster than float32's
and the tile takes half the bytes; its error is bfloat16's (~2^-9 relative per operand), so
the engine opts in explicitly (layers/quant_linear.py). `triton_quant_matmul` is the GPU kernel: one
program computes a BLOCK_M x BLOCK_N tile of y, loading integer tiles of BLOCK_K = group
columns and dequantising them in registers before `tl.dot`.
"""

from __future__ import annotations

import functools
import threading

import torch


def ref_quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group: int,
    offset: int = 0,
    chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference / CPU path (see the module docstring); `dtype` is the tile's and the
    GEMM's (float32: exact; bfloat16: rounded operands, for hardware bfloat16 GEMMs)."""
    n = qweight.shape[0]
    m, k = x.shape
    rows = min(n, chunk or _chunk_rows(m, k))
    tile = _scratch(rows * k, x.device, dtype)
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    xs = x.to(dtype)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        w = _scaled(qweight[start:end], scales[start:end], bits, group, tile[: (end - start) * k])
        if dtype == torch.float32:
            torch.matmul(x, w.t(), out=y[:, start:end])
        else:
            y[:, start:end] = torch.nn.functional.linear(xs, w)
    shift = group_shift(scales, zeros, offset)
    if shift is not None:
        # NOTE: the per-group constant of W (zeros - offset * scales) times x summed per group.
        y.addmm_(x.reshape(m, k // group, group).sum(-1), shift.t())
    return y


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
    bits: int, group: int, offset: int = 0,
) -> torch.Tensor:
    """float32 W [N, K] of a group-wise integer weight."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    w = _scaled(qweight, scales, bits, group, torch.empty(n * k, dtype=torch.float32, device=qweight.device))
    shift = group_shift(scales, zeros, offset)
    if shift is not None:
        w.view(n, k // group, group).add_(shift.unsqueeze(-1))
    return w


def _scaled(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
            out: torch.Tensor) -> torch.Tensor:
    """q * scales [N, K] in `out`'s dtype, written into `out` (N * K elements)."""
    if bits == 4:
        qweight = unpack_nibbles(qweight)
    n, k = qweight.shape
    w = out.view(n, k)
    # NOTE: convert, then scale in place: two vectorised passes run ~2x faster than one
    # mixed int8 x float32 multiply (dtype casts take torch's scalar loop). float32 scales:
    # an int8 x float16 product would be rounded to float16.
    w.copy_(qweight)
    w.view(n, k // group, group).mul_(scales.to(w.dtype).unsqueeze(-1))
    return w


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] of 4-bit values (low nibble first) -> uint8 [N, K], one value each."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def group_shift(scales: torch.Tensor, zeros: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    """The constant each group adds to q * scale: zeros - offset * scales [N, K // group]."""
    if not offset:
        return None if zeros is None else zeros.float()
    shift = scales.float() * -offset
    return shift if zeros is None else shift.add_(zeros.float())


def _chunk_rows(m: int, k: int) -> int:
    """Output rows per dequantised tile: ~1 MiB of float32 for decode-sized x (cache
    resident), larger tiles when many rows share each tile (prefill)."""
    budget = (1 << 18) if m <= CHUNK_SMALL_M else (1 << 21)
    return max(16, budget // k)


CHUNK_SMALL_M = 16
_SCRATCH = threading.local()


def _scratch(numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `dtype` buffer of at least `numel` elements, reused by this thread's calls on
    `device` (a dequantised tile is consumed before the next call asks for one)."""
    key = f"{device}/{dtype}"
    buf = getattr(_SCRATCH, "bufs", {}).get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH.bufs = {**getattr(_SCRATCH, "bufs", {}), key: buf}
    return buf[:numel]


@functools.cache
def _kernel():
    """Build the jitted kernel on first use (triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quant_matmul_kernel(
        X, Q, S, Z, Y, M, N, K,
        stride_xm, stride_qn, stride_sn, stride_ym,
        BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = g * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None], other=0.0).to(tl.float32)
            if BITS == 4:
                byte = tl.load(Q + offs_n[:, None] * stride_qn + (offs_k // 2)[None, :],
                               mask=n_mask[:, None], other=0)
                q = (byte.to(tl.int32) >> ((offs_k % 2) * 4)[None, :]) & 15
            else:
                q = tl.load(Q + offs_n[:, None] * stride_qn + offs_k[None, :],
                            mask=n_mask[:, None], other=0).to(tl.int32)
            s = tl.load(S + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            w = (q - OFFSET).to(tl.float32) * s[:, None]
            if HAS_Z:
                z = tl.load(Z + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
                w = w + z[:, None]
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])

    return quant_matmul_kernel


def triton_quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group: int,
    offset: int = 0,
    block_m: int = 16,
    block_n: int = 64,
) -> torch.Tensor:
    """Launcher: checks shapes and strides, then runs the kernel (see the module docstring)."""
    import triton

    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    m, k = x.shape
    n = qweight.shape[0]
    assert bits in (4, 8) and qweight.stride(1) == 1
    assert qweight.shape[1] * (2 if bits == 4 else 1) == k, (qweight.shape, k, bits)
    assert group >= 16 and group & (group - 1) == 0 and k % group == 0, (group, k)
    assert scales.shape == (n, k // group) and scales.is_contiguous()
    assert zeros is None or (zeros.shape == scales.shape and zeros.is_contiguous())
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _kernel()[grid](
        x, qweight, scales, scales if zeros is None else zeros, y, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, OFFSET=offset, HAS_Z=zeros is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=group,
    )
    return y


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group: int,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x [..., K] -> [..., N] float32: the Triton kernel on CUDA, the reference on CPU
    (`dtype`: see `ref_quant_matmul`)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.is_cuda and group >= 16 and group & (group - 1) == 0:
        y = triton_quant_matmul(flat.contiguous(), qweight, scales, zeros,
                                bits=bits, group=group, offset=offset)
    else:
        y = ref_quant_matmul(flat.float(), qweight, scales, zeros, bits=bits, group=group,
                             offset=offset, dtype=dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
