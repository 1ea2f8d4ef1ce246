"""Quantized weights kept quantized at run time: one group-wise integer format.

A `QuantWeight` of logical shape [N, K] dequantises as

    w[n, k] = scales[n, g] * (q[n, k] - offset) + zeros[n, g]     (g = k // group)

with `q` stored as int8 (`bits=8`, signed values) or two 4-bit values per byte
(`bits=4`, unsigned 0..15, byte j of a row holds k = 2j in its low nibble, 2j+1 in the
high one). `zeros` is optional. This one format holds every GGUF type we keep quantized,
each exactly (dequantising it reproduces `gguf.quants.dequantize` up to float32 rounding):

    Q4_0  d * (q - 8)               -> bits 4, group 32, offset 8, scales d (float16)
    Q4_K  d*sc * q - dmin*m         -> bits 4, group 32, scales d*sc, zeros -dmin*m
    Q5_0  d * (q - 16)              -> bits 8, group 32, q - 16 stored, scales d (float16)
    Q5_K  d*sc * q - dmin*m         -> bits 8, group 32, q - 16 stored, zeros 16*d*sc - dmin*m
    Q6_K  d*sc * (q - 32)           -> bits 8, group 16, q - 32 stored, scales d*sc
    Q8_0  d * q                     -> bits 8, group 32, scales d (float16)

`quantize_int8` / `quantize_int4` make the same format from float weights at load time
(per-channel int8, symmetric; group-wise asymmetric int4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmql.kernels.quant_matmul import dequantize, unpack_nibbles

QK_K = 256


@dataclass
class QuantWeight:
    """A [N, K] weight in the group-wise integer format (see the module docstring)."""

    qweight: torch.Tensor  # int8 [N, K] (bits 8) or uint8 [N, K // 2] (bits 4)
    scales: torch.Tensor  # float16/float32 [N, K // group]
    zeros: torch.Tensor | None  # float32 [N, K // group] or None
    bits: int
    group: int
    offset: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.qweight.shape
        return n, width * 2 if self.bits == 4 else width

    @property
    def nbytes(self) -> int:
        extra = self.zeros.nbytes if self.zeros is not None else 0
        return self.qweight.nbytes + self.scales.nbytes + extra

    def layout(self) -> tuple:
        """What two weights must share to be stacked into one matmul."""
        return (self.bits, self.group, self.offset, self.zeros is None, self.scales.dtype,
                self.shape[1])

    def dequantize(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """float32 [n, K] of `rows` (a slice or an index tensor)."""
        z = None if self.zeros is None else self.zeros[rows]
        return dequantize(self.qweight[rows], self.scales[rows], z, bits=self.bits,
                          group=self.group, offset=self.offset)

    def select_rows(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (e.g. undoing llama.cpp's Q/K row permutation)."""
        zeros = None if self.zeros is None else self.zeros[index].contiguous()
        return QuantWeight(self.qweight[index].contiguous(), self.scales[index].contiguous(), zeros,
                           self.bits, self.group, self.offset)

    def widened(self) -> QuantWeight:
        """The same weight with 4-bit values stored one per int8 (twice the bytes of `qweight`,
        no nibble unpacking when dequantised: ~20% faster CPU matmuls at decode sizes)."""
        if self.bits != 4:
            return self
        q = unpack_nibbles(self.qweight)
        return QuantWeight(q.to(torch.int8), self.scales, self.zeros, 8, self.group, self.offset)

    def to(self, device: str | torch.device) -> QuantWeight:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return QuantWeight(self.qweight.to(device), self.scales.to(device), zeros,
                           self.bits, self.group, self.offset)


def stack_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Concatenate weights of one layout along N."""
    first = parts[0]
    assert all(p.layout() == first.layout() for p in parts), [p.layout() for p in parts]
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
    return QuantWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                       zeros, first.bits, first.group, first.offset)


# -- GGUF blocks -> QuantWeight ------------------------------------------------------------


def from_gguf(data: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> QuantWeight | None:
    """The runtime weight of a 2-D GGUF tensor (`data`: uint8 [rows, bytes per row]), or None
    if the type is not one we keep quantized."""
    from gguf.constants import GGMLQuantizationType as T

    kind = T(ggml_type).name
    convert = _CONVERTERS.get(kind)
    if convert is None:
        return None
    n, k = shape
    blocks = np.ascontiguousarray(data).reshape(n * k // _BLOCK[kind], -1)
    return convert(blocks, n, k)


_BLOCK = {"Q4_0": 32, "Q5_0": 32, "Q8_0": 32, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """ggml's [.., width/2] bytes -> [.., width] values: low nibbles first, then high."""
    lo, hi = qs & np.uint8(15), qs >> np.uint8(4)
    return np.concatenate([lo, hi], axis=-1)


def _pack4(q: np.ndarray, n: int, k: int) -> torch.Tensor:
    q = q.reshape(n, k // 2, 2)
    return torch.from_numpy(np.ascontiguousarray(q[..., 0] | (q[..., 1] << np.uint8(4))))


def _weight(q: torch.Tensor, scales: np.ndarray, zeros: np.ndarray | None, n: int, bits: int,
            group: int, offset: int = 0) -> QuantWeight:
    z = None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros).reshape(n, -1))
    return QuantWeight(q, torch.from_numpy(np.ascontiguousarray(scales).reshape(n, -1)), z,
                       bits, group, offset)


def _q4_0(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    q = _nibbles(blocks[:, 2:], 32)
    return _weight(_pack4(q, n, k), _f16(blocks[:, :2]), None, n, 4, 32, offset=8)


def _q8_0(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(n, k))
    return _weight(q, _f16(blocks[:, :2]), None, n, 8, 32)


def _q5_0(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    q = (_nibbles(blocks[:, 6:], 32) | (high << np.uint8(4))).astype(np.int8) - np.int8(16)
    return _weight(torch.from_numpy(q.reshape(n, k)), _f16(blocks[:, :2]), None, n, 8, 32)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (d*sc, dmin*m) per 32-value sub-block, float32 [blocks, 8]."""
    from gguf.quants import Q4_K

    d = _f16(blocks[:, 0:2]).astype(np.float32)
    dmin = _f16(blocks[:, 2:4]).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_k(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    scale, mins = _k_scales(blocks)
    qs = blocks[:, 16:].reshape(-1, 4, 32)
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # [b, 4, 64]
    return _weight(_pack4(q, n, k), scale, -mins, n, 4, 32)


def _q5_k(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    scale, mins = _k_scales(blocks)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qs = blocks[:, 48:].reshape(-1, 4, 32)
    lo = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1).reshape(-1, 8, 32)
    q = (lo | ((qh & np.uint8(1)) << np.uint8(4))).astype(np.int8) - np.int8(16)
    zeros = np.float32(16) * scale - mins
    return _weight(torch.from_numpy(q.reshape(n, k)), scale, zeros, n, 8, 32)


def _q6_k(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    ql = blocks[:, :128].reshape(-1, 2, 64)
    ql = np.concatenate([ql & np.uint8(15), ql >> np.uint8(4)], axis=-1)  # [b, 2, 128]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(-1, 2, 128)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    scale = _f16(blocks[:, 208:210]).astype(np.float32) * sc
    return _weight(torch.from_numpy(q.reshape(n, k)), scale, None, n, 8, 16)


_CONVERTERS = {"Q4_0": _q4_0, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q5_K": _q5_k,
               "Q6_K": _q6_k}
SUPPORTED_GGUF_TYPES = tuple(_CONVERTERS)


# -- load-time quantization of float weights -------------------------------------------------


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Per-output-channel symmetric int8: |error| <= scale / 2 = max|w_row| / 254."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return QuantWeight(q, scale, None, 8, w.shape[1])


def quantize_int4(w: torch.Tensor, group: int = 64) -> QuantWeight:
    """Group-wise asymmetric int4 (min/max per group): |error| <= (max - min) / 30 per group."""
    n, k = w.shape
    if k % group:
        group = next((g for g in (128, 64, 32, 16) if k % g == 0), k)
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).contiguous()
    return QuantWeight(packed, scale.contiguous(), lo.contiguous(), 4, group)


def quantize(w: torch.Tensor, mode: str) -> QuantWeight:
    """`mode` "int8" or "int4" (see `quantize_int8`, `quantize_int4`)."""
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown quantization {mode!r}")
