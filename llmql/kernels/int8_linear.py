"""Dynamic-int8 linear on CPU: y = x W^T with W per-output-channel int8 and x quantized per
call (llama.cpp's "Q8 activations" idea), through FBGEMM's integer GEMM.

Shapes: x [M, K] float32, W [N, K] float32 (quantized once by `pack_int8_weight`) ->
y [M, N] float32.

`ref_int8_linear` is the torch reference of what FBGEMM computes: x is quantized
per tensor to unsigned 7-bit (`reduce_range`, scale and zero point from x's min/max,
which must include 0), W per row to signed int8 (symmetric, scale max|w|/127), the
integer products are summed exactly in int32 and rescaled. `int8_linear` runs the same on
FBGEMM's packed weight; they agree up to an activation rounded to its neighbouring step.

Why: on 2-core AVX2 CPUs a float32 GEMM is compute-bound already at a few rows, and the
integer path (`vpmaddubsw`) does about twice the multiply-adds per instruction on a quarter
of the weight bytes (docs/benchmarks.md, "Quantized weights"). Alone, 7-bit per-tensor activations
cost 3-14% relative error per layer on the default model; with `compensate` (a second GEMM
of the rounding residual) 0.4-1%, the error of the per-channel int8 weights. The engine
compensates its linears and re-scores the LM head's top tokens exactly instead
(layers/quant_linear.py).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch


@functools.cache
def int8_linear_available() -> bool:
    """Whether this torch build runs FBGEMM's dynamic int8 linear here (x86 CPUs)."""
    try:
        packed = pack_int8_weight(torch.eye(8))
        y = int8_linear(torch.ones(2, 8), packed)
        return bool(torch.allclose(y, torch.ones(2, 8), atol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Int8Weight(NamedTuple):
    """A packed weight: `main` = per-channel int8 of W; `residual` = per-channel int8 of
    W - dequant(main) (or None), which makes the pair exact to ~1/127 of int8's error."""

    main: torch.Tensor
    residual: torch.Tensor | None


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 scales of w [N, K] (float64, as FBGEMM stores them).

    NOTE: max(amax, -amin) rather than `w.abs().amax()`: no [N, K] temporary (the LM head
    is packed in 64 MiB chunks, and a second 64 MiB at each raised the load's peak RSS)."""
    return (torch.maximum(w.amax(dim=1), -w.amin(dim=1)).double() / 127).clamp_min(1e-12)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """w rounded as `pack_int8_weight` stores it (float32)."""
    ws = weight_scales(w).unsqueeze(1)
    return (torch.clamp(torch.round(w.double() / ws), -127, 127) * ws).float()


def pack_int8_weight(w: torch.Tensor, *, residual: bool = False) -> Int8Weight:
    """w [N, K] float32 (CPU) -> FBGEMM's packed per-channel int8 weight(s)."""
    w = w.detach().float().contiguous()
    main = _prepack(w)
    return Int8Weight(main, _prepack(w - quantize_weight(w)) if residual else None)


def _prepack(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # NOTE: torch marks quantized-tensor constructors as deprecated; the ops run here.
        warnings.simplefilter("ignore")
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        q = torch.quantize_per_channel(w, weight_scales(w), zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def int8_linear(x: torch.Tensor, weight: Int8Weight, *, compensate: bool = False) -> torch.Tensor:
    """x [..., K] float32 -> [..., N] float32 with a weight from `pack_int8_weight`.

    `compensate`: add a second int8 GEMM of the activations' rounding residual
    (x - dequant(quant(x))), which leaves about the weight's own error (~14-bit activations).
    A weight with a `residual` adds its GEMM too (x's rounding times the weight's residual,
    the fourth product, is left out: ~1/127 of either correction).
    """
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = torch.ops.quantized.linear_dynamic(flat, weight.main, True)
    if flat.numel():
        if weight.residual is not None:
            y += torch.ops.quantized.linear_dynamic(flat, weight.residual, True)
        if compensate:
            y += torch.ops.quantized.linear_dynamic(flat - fake_quant_activations(flat), weight.main, True)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fake_quant_activations(x: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """x rounded as FBGEMM's dynamic linear quantizes it (per tensor, unsigned 7-bit; `qmax`
    255: the 8 bits `onednn_int8_linear` uses)."""
    q, scale, zero = _quantize_activations(x, qmax)
    return q.sub_(zero).mul_(scale)


def _quantize_activations(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, float, int]:
    """x -> (its unsigned integer values, as floats, scale, zero point), per tensor,
    asymmetric over [min(x, 0), max(x, 0)]."""
    lo = min(float(x.min()), 0.0) if x.numel() else 0.0
    hi = max(float(x.max()), 0.0) if x.numel() else 0.0
    scale = max((hi - lo) / qmax, 1e-12)
    zero = min(max(round(-lo / scale), 0), qmax)
    return torch.round(x / scale).add_(zero).clamp_(0, qmax), scale, zero


class OnednnInt8Weight(NamedTuple):
    """A per-channel symmetric int8 weight reordered for oneDNN's int8 GEMM: `scales`
    float32 [N], `zeros` int64 [N] (all 0)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


@functools.cache
def onednn_int8_available() -> bool:
    """Whether this torch build runs oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`)
    here."""
    try:
        y = onednn_int8_linear(torch.ones(2, 8), pack_onednn_int8(torch.eye(8)))
        return bool(torch.allclose(y, torch.ones(2, 8), atol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 values [N, K], float32 per-row scales [N]), symmetric, max|w| -> 127.

    NOTE: one float temporary, rounded and clamped in place (the LM head is packed in 64 MiB
    chunks; out-of-place round and clamp raised the load's peak RSS by ~90 MiB)."""
    scales = weight_scales(w).float()
    q = w / scales.unsqueeze(1)
    return q.round_().clamp_(-127, 127).to(torch.int8), scales


def pack_onednn_int8(w: torch.Tensor) -> OnednnInt8Weight:
    """w [N, K] float32 (CPU) -> its per-channel int8 copy in oneDNN's blocked layout."""
    q, scales = _int8_rows(w.detach().float().contiguous())
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    return OnednnInt8Weight(packed, scales, torch.zeros(w.shape[0], dtype=torch.long))


def onednn_int8_linear(x: torch.Tensor, weight: OnednnInt8Weight) -> torch.Tensor:
    """x [..., K] float32 -> [..., N] float32: x quantized per tensor to unsigned 8-bit, the
    integer products summed by oneDNN (Intel AMX tiles where the CPU has them: ~2.5x
    FBGEMM's int8 GEMM on the LM head at 60 rows, 7x at 16) and rescaled."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    n = weight.scales.shape[0]
    if not flat.shape[0]:
        return flat.new_zeros(*x.shape[:-1], n)
    qx, scale, zero = _quantize_activations(flat, 255)
    y = torch.ops.onednn.qlinear_pointwise(qx.to(torch.uint8), scale, zero, weight.packed, weight.scales, weight.zeros,
                                           None, 1.0, 0, torch.float32, "none", [], "")
    return y.reshape(*x.shape[:-1], n)


def ref_onednn_int8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Torch reference of `onednn_int8_linear(x, pack_onednn_int8(w))`."""
    q, scales = _int8_rows(w.float())
    xq = fake_quant_activations(x.float(), 255)
    return (xq.double() @ (q.double() * scales.double().unsqueeze(1)).t()).float()


def ref_int8_linear(x: torch.Tensor, w: torch.Tensor, *, residual: bool = False,
                    compensate: bool = False) -> torch.Tensor:
    """Torch reference of `int8_linear(x, pack_int8_weight(w, residual=...), compensate=...)`."""
    x = x.float()
    xq = fake_quant_activations(x)
    w1 = quantize_weight(w)
    y = xq.double() @ w1.double().t()
    if residual:
        y += xq.double() @ quantize_weight(w - w1).double().t()
    if compensate:
        r = x - xq
        y += fake_quant_activations(r).double() @ w1.double().t()
    return y.float()
