"""Dense linear y = x W^T + b on CPU through oneDNN with a pre-packed weight.

Shapes: x [..., in], weight [out, in], bias [out] or None -> [..., out].

`ref_linear` is the torch reference (`F.linear`, MKL sgemm). On CPU float32 the oneDNN
GEMM on a weight reordered once into its blocked layout runs ~2x faster (3x for the
small row counts of decode steps) on AVX-512 machines; the results agree with the
reference to float32 rounding (the summation order differs). There is no Triton body:
on CUDA, `F.linear` (cuBLAS) is already the fast path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: `F.linear`."""
    return F.linear(x, weight, bias)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear ops and they run here."""
    try:
        w = pack_linear_weight(torch.ones(4, 8))
        y = cpu_packed_linear(torch.ones(2, 8), w)
        return bool(torch.allclose(y, torch.full((2, 4), 8.0)))
    except (AttributeError, RuntimeError):
        return False


def amx_available() -> bool:
    """Whether this CPU has Intel AMX tiles, which oneDNN uses for torch's bfloat16 and int8
    GEMMs (4-6x a float32 GEMM on the same cores; elsewhere a bfloat16 GEMM is no faster
    than float32). `LLMQL_CPU_AMX=0` says no and `=1` yes, whatever the CPU (read at each
    call: the engine asks once per model load)."""
    from llmql.settings import env_choice

    wanted = env_choice("LLMQL_CPU_AMX", ("auto", "0", "1"), "auto")
    return _cpu_has_amx() if wanted == "auto" else wanted == "1"


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())  # NOTE: private API, torch >= 2.3
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weight(weight: torch.Tensor, batch_hint: int = 512) -> torch.Tensor:
    """weight [out, in] float32 (CPU) -> an opaque oneDNN-packed tensor for `cpu_packed_linear`."""
    assert weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def cpu_packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] float32 -> [..., out] with a weight from `pack_linear_weight`."""
    assert x.dtype == torch.float32 and x.device.type == "cpu", (x.dtype, x.device)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], y.shape[-1])
