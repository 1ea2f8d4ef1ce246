"""Group-wise int8 weights times float32 activations on x86 CPUs (AVX-512 or AVX2), in one kernel.

Shapes: x [M, K] float32, a `PackedGrouped` weight [N, K] -> y [M, N] float32, with
W[n, k] = scale[n, g] * q[n, k] + shift[n, g] (g = k // group): the values of a GGUF tensor
(Q5_0, Q8_0, Q6_K... as int8, Q4_0 and Q4_K as 4-bit nibbles, their scales, mins and
offsets folded into scale and shift), the arithmetic float32's.

`ref_grouped_gemm` is the torch reference (dequantise, then `x @ W^T`). `grouped_gemm` runs
csrc/grouped_gemm.c: the weight is packed once in blocks of 32 output rows ([N/32, K, 32]
int8, K-major inside a block); each block is dequantised into a float32 buffer of its thread
(at most K x 32 floats: it stays in cache) and multiplied by all of x with an 8 x 32
register-blocked FMA microkernel; up to 6 rows dequantise in registers and multiply at once.
Measured on the AMX box (2 threads, 2026-12-04) against oneDNN's float32 GEMM on a pre-packed
float32 weight: equal at 60 and 512 rows (gate+up 4096x640 at 60 rows: 1.07 vs 1.04 ms), 2-4x
faster at 1-4 rows, where it reads a quarter of the bytes; the torch path it replaces
(dequantise a tile, then the GEMM) took 2.4 ms there.

CPUs with AVX2 but not AVX-512 run csrc/avx2/grouped_gemm.c, an AVX2 + FMA build with the
same export, layout and roundings (16 ymm registers: each block in two halves of 16
outputs, up to 6 rows dequantised in registers, more rows from the buffer in 6 x 16 tiles).
Measured on an AVX-512 box running both builds (`LLMQL_CPU_KERNELS=avx2` forces the AVX2 one;
2 threads, medians, 2026-12-04), the default model's 4-bit linears (Q4_K: scales and
shifts), ms:

    K -> N (layer)        rows   AVX2    AVX-512   torch tiles (LLMQL_CPU_KERNELS=0)
    640 -> 1536 (qkv)       1    0.052   0.035     0.29
                            6    0.099   0.065     0.35
                           60    0.68    0.43      1.03
    640 -> 4096 (gate_up)   1    0.128   0.083     0.70
                            6    0.26    0.18      0.84
                           60    1.88    1.32      2.50
    2048 -> 640 (down)      1    0.070   0.045     0.37
                            6    0.129   0.084     0.44
                           60    0.95    0.61      1.26

The AVX2 build takes 1.4-1.6x the AVX-512 kernel's time (half the vector width) and is 3-6x
faster than the torch path at 1-6 rows, 1.3-1.5x at 60 (whose GEMM ran on AVX-512 here: on an
AVX2 CPU it is slower still).

The C files are built by kernels/cpu_lib.py (compiled on first use, loaded with ctypes,
torch's OpenMP threads; `kernel_library` picks the build). Where neither runs (no AVX2, no C
compiler, `LLMQL_CPU_KERNELS=0`), `kernel_available("llmql_grouped_gemm")` is False and the engine keeps
the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmql.kernels.cpu_lib import kernel_library
from llmql.kernels.quant_matmul import group_shift, unpack_nibbles

BLOCK = 32  # output rows per packed block (two AVX-512 vectors, four AVX2 ones)


@dataclass
class PackedGrouped:
    """A [n, k] group-wise weight in `grouped_gemm`'s layout (see the module docstring): q
    int8 [blocks, k, 32] (bits 8) or uint8 [blocks, k, 16] (bits 4: row j of a block in the
    low nibble, row j + 16 in the high one), scales and shifts (or None) float32
    [blocks, k // group, 32]."""

    q: torch.Tensor
    scales: torch.Tensor
    shifts: torch.Tensor | None
    n: int
    k: int
    group: int
    bits: int = 8

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes + (self.shifts.nbytes if self.shifts is not None else 0)


def pack_grouped(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                 group: int, offset: int = 0, bits: int = 8) -> PackedGrouped:
    """The `QuantWeight` fields (W = scales * (q - offset) + zeros): q int8 [N, K] (bits 8) or
    uint8 [N, K // 2] (bits 4, two values per byte, low nibble first), scales [N, K // group],
    zeros [N, K // group] or None -> a `PackedGrouped` with the same values (4-bit values
    stay 4-bit: half the bytes of int8)."""
    want = {8: torch.int8, 4: torch.uint8}.get(bits)
    if want is None or qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"pack_grouped needs int8 [N, K] (bits 8) or uint8 [N, K // 2] (bits 4), "
                         f"got {qweight.dtype} {tuple(qweight.shape)} with bits {bits}")
    if bits == 4:
        qweight = unpack_nibbles(qweight)
    n, k = qweight.shape
    if k % group or scales.shape != (n, k // group):
        raise ValueError(f"scales {tuple(scales.shape)} do not match q {(n, k)} with group {group}")
    shift = group_shift(scales, zeros, offset)
    q = _blocked(qweight)
    if bits == 4:  # NOTE: rows j and j + 16 of a block share a byte
        q = (q[..., :16] | (q[..., 16:] << 4)).contiguous()
    return PackedGrouped(q=q, scales=_blocked(scales.float()),
                         shifts=None if shift is None else _blocked(shift), n=n, k=k, group=group, bits=bits)


def unpack_grouped(w: PackedGrouped) -> torch.Tensor:
    """float32 W [n, k] of a packed weight (the reference's dequantisation)."""
    q = w.q if w.bits == 8 else torch.cat((w.q & 15, w.q >> 4), dim=-1)
    q = q.transpose(1, 2).reshape(-1, w.k)[: w.n].float()
    scales = w.scales.transpose(1, 2).reshape(-1, w.k // w.group)[: w.n]
    out = q.view(w.n, -1, w.group).mul_(scales.unsqueeze(-1))
    if w.shifts is not None:
        shifts = w.shifts.transpose(1, 2).reshape(-1, w.k // w.group)[: w.n]
        out.add_(shifts.unsqueeze(-1))
    return out.view(w.n, w.k)


def ref_grouped_gemm(x: torch.Tensor, w: PackedGrouped) -> torch.Tensor:
    """Torch reference: x [M, K] -> x @ W^T [M, N] float32 with W dequantised."""
    return x.float() @ unpack_grouped(w).t()


def grouped_gemm(x: torch.Tensor, w: PackedGrouped, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided) -> y [M, N] float32 on the C kernel (AVX-512, else
    AVX2: `kernel_library`), written
    into `out` when given (a float32 [M, N] view whose rows may be strided, e.g. columns of a
    wider output)."""
    lib = kernel_library("llmql_grouped_gemm")
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != w.k:
        raise ValueError(f"x must be float32 [M, {w.k}] with unit column stride, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n, dtype=torch.float32)
    elif out.shape != (m, w.n) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [{m}, {w.n}] with unit column stride")
    rc = lib.llmql_grouped_gemm(
        x.data_ptr(), m, w.k, x.stride(0), w.q.data_ptr(), w.bits, w.scales.data_ptr(),
        w.shifts.data_ptr() if w.shifts is not None else None, w.n, w.group,
        out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("grouped_gemm: the kernel could not allocate its per-thread buffer")
    return out


def _blocked(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N / 32), C, 32] (rows padded with zeros), contiguous."""
    n, c = t.shape
    blocks = -(-n // BLOCK)
    padded = F.pad(t, (0, 0, 0, blocks * BLOCK - n)) if blocks * BLOCK != n else t
    return padded.reshape(blocks, BLOCK, c).transpose(1, 2).contiguous()
