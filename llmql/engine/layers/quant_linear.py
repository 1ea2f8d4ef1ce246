"""Quantized weights inside the float layers (`Linear` and its packed forms, the embedding,
the LM head).

A layer whose checkpoint tensor arrives as a `QuantWeight` keeps it in a `QuantParts`
(`module.quant`): packed layers (QKV, gate+up) receive one part per shard, possibly of
different GGUF types. `finalize_quantized(model)` stacks neighbouring parts of one layout
into one matmul, ties the LM head to a quantized embedding, and drops the float
placeholders (they become `meta` tensors: shape and dtype only, no memory). The layers'
`forward(x) -> y` signatures do not change.

On x86 CPUs (`int8_linear_available()`, unless `LLMQL_INT8_GEMM=0`) the LM head runs on
FBGEMM's dynamic-int8 GEMM (kernels/int8_linear.py, `Int8Packed`: re-quantized per output
channel once) and re-scores its `RESCORE_TOP` best tokens per row from its exact copy, so the
greedy token and the top of the distribution are those of the exact weights for the given
hidden state (the tied embedding keeps using the exact copy, which may stay in the GGUF
file: `FileQuantWeight`). The other linears run as `finalize_quantized(layers=...)` says:
group-wise exact (weight-only: dequantised tile by tile at each call, float32 arithmetic;
"grouped" widens 4-bit values to int8 for a cheaper dequantisation, and on AVX-512 or AVX2
CPUs runs them on kernels/cpu_gemm.py's kernel, which dequantises in cache as it multiplies:
as fast as a float32 GEMM at 60 rows, 2-4x faster at 1-4), on the int8 GEMM
(fast, approximate: int8 weights, activations rounded to 7 bits and compensated), or
dequantised to float32 once.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import nn

from llmql.engine.weights.quant import QuantWeight, stack_rows
from llmql.kernels.cpu_gemm import PackedGrouped, grouped_gemm, pack_grouped
from llmql.kernels.cpu_lib import kernel_available
from llmql.kernels.int8_linear import (
    int8_linear,
    int8_linear_available,
    onednn_int8_available,
    onednn_int8_linear,
    pack_int8_weight,
    pack_onednn_int8,
)
from llmql.kernels.linear import amx_available
from llmql.kernels.quant_matmul import quant_matmul

RESCORE_TOP = 16  # LM-head logits recomputed exactly per row on the int8 path
PACK_BYTES = 64 << 20  # float32 bytes re-quantized at a time when packing for int8 (fewer, larger
# chunks run faster: the LM head in 11 chunks took 36 ms at 24 rows against 47 ms in 41)


class QuantParts:
    """A quantized [N, K] weight as row ranges, each a `QuantWeight`."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.parts: list[tuple[int, QuantWeight]] = []
        self.int8: Int8Packed | None = None
        self.packed: list[tuple[int, PackedGrouped]] = []  # `use_cpu_kernel`
        self.dtype = torch.float32  # of the dequantised tiles and their GEMM (`quant_matmul`)

    def use_int8(self) -> None:
        """Run `matmul` on the dynamic-int8 GEMM (activation residual compensated) and drop
        the group-wise copy."""
        self.int8 = Int8Packed(self, compensate=True)
        self.parts = []

    def use_cpu_kernel(self) -> None:
        """Run `matmul` on the grouped C kernel (kernels/cpu_gemm.py: the same values,
        float32 arithmetic) with each part packed into its layout (8-bit values as int8,
        4-bit ones as nibbles), the group-wise copy dropped."""
        self.packed = []
        for start, w in self.parts:
            self.packed.append((start, pack_grouped(w.qweight, w.scales, w.zeros, group=w.group,
                                                    offset=w.offset, bits=w.bits)))
        self.parts = []

    def add(self, start: int, weight: QuantWeight) -> None:
        """Set rows [start, start + weight rows) (K must match)."""
        if weight.shape[1] != self.shape[1] or start + weight.shape[0] > self.shape[0]:
            raise ValueError(f"quantized shard {weight.shape} at row {start} does not fit {self.shape}")
        self.parts.append((start, weight))

    def finalize(self) -> None:
        """Sort parts, check they cover every row once, stack runs of one layout."""
        self.parts.sort(key=lambda p: p[0])
        row = 0
        merged: list[tuple[int, list[QuantWeight]]] = []
        for start, w in self.parts:
            if start != row:
                raise ValueError(f"quantized weight {self.shape}: rows {row}..{start} not loaded")
            if merged and merged[-1][1][0].layout() == w.layout():
                merged[-1][1].append(w)
            else:
                merged.append((start, [w]))
            row = start + w.shape[0]
        if row != self.shape[0]:
            raise ValueError(f"quantized weight {self.shape}: only {row} rows loaded")
        self.parts = [(start, ws[0] if len(ws) == 1 else stack_rows(ws)) for start, ws in merged]

    @property
    def nbytes(self) -> int:
        packed = sum(p.nbytes for _, p in self.packed)
        return sum(w.nbytes for _, w in self.parts) + packed + (self.int8.nbytes if self.int8 else 0)

    def matmul(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N] float32 (or only the output columns `rows`)."""
        if self.int8 is not None and rows is None:
            return self.int8.matmul(x)
        if self.packed and rows is None:
            return self._kernel_matmul(x)
        if not self.parts:
            raise RuntimeError("this weight was kept only as int8 or packed (QuantParts.use_int8, "
                               "use_cpu_kernel)")
        if rows is not None:
            return _matmul(x, self._select(rows))
        outs = [_matmul(x, w, self.dtype) for _, w in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype != torch.float32 or flat.stride(1) != 1:
            flat = flat.float().contiguous()
        out = torch.empty(flat.shape[0], self.shape[0], dtype=torch.float32, device=x.device)
        for start, packed in self.packed:
            grouped_gemm(flat, packed, out[:, start : start + packed.n])
        return out.reshape(*x.shape[:-1], self.shape[0])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantised rows `index` [T] -> float32 [T, K] (embedding lookup)."""
        if len(self.parts) == 1:
            return self.parts[0][1].dequantize(index)
        return self._select(index).dequantize()

    def _select(self, index: torch.Tensor) -> QuantWeight:
        parts = []
        for start, w in self.parts:
            local = index - start
            keep = (local >= 0) & (local < w.shape[0])
            parts.append((keep, w.select_rows(local[keep])))
        if len(parts) == 1:
            return parts[0][1]
        # NOTE: rows from several parts only when layouts differ; keep the caller's order.
        order = torch.cat([torch.nonzero(k).flatten() for k, _ in parts]).argsort()
        return stack_rows([w for _, w in parts]).select_rows(order)


class Int8Packed:
    """The rows of a `QuantParts` as packed per-channel int8 chunks: FBGEMM's, or with
    `onednn` oneDNN's (its int8 GEMM runs on AMX tiles where the CPU has them; no
    `compensate`)."""

    def __init__(self, weight: QuantParts, *, compensate: bool = False, onednn: bool = False) -> None:
        if onednn and compensate:
            raise ValueError("the oneDNN int8 chunks have no compensated form")
        self.compensate = compensate
        self.onednn = onednn
        self.chunks = []
        step = max(1, PACK_BYTES // (4 * weight.shape[1]))
        pack = pack_onednn_int8 if onednn else pack_int8_weight
        for _, w in weight.parts:
            for start in range(0, w.shape[0], step):
                rows = slice(start, min(w.shape[0], start + step))
                self.chunks.append(pack(w.dequantize(rows)))
                if w.shape[0] > step:
                    trim_heap()  # NOTE: or each chunk's float32 transient stays in the heap
        n, k = weight.shape
        self.n = n
        # NOTE: int8 values + per row an int64 zero point and a float64 (FBGEMM) or float32 scale
        self.nbytes = n * k + (12 if onednn else 16) * n

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] float32 (each chunk's output copied into one tensor as it
        comes: a 60-row LM head's logits are 63 MiB, held once, not twice as by a `cat`)."""
        if len(self.chunks) == 1:
            return self.chunk_matmul(x, self.chunks[0])
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], self.n, dtype=torch.float32, device=x.device)
        col = 0
        for packed in self.chunks:
            y = self.chunk_matmul(flat, packed)
            out[:, col : col + y.shape[1]] = y
            col += y.shape[1]
        return out.reshape(*x.shape[:-1], self.n)

    def chunk_matmul(self, x: torch.Tensor, packed: object) -> torch.Tensor:
        """x [..., K] -> [..., rows of `packed`] float32, on the GEMM `packed` is for."""
        if self.onednn:
            return onednn_int8_linear(x, packed)  # type: ignore[arg-type]
        return int8_linear(x, packed, compensate=self.compensate)  # type: ignore[arg-type]


def rescored_logits(hidden: torch.Tensor, approx: Int8Packed, exact: QuantParts,
                    top: int = RESCORE_TOP) -> torch.Tensor:
    """hidden [T, K] -> logits [T, N] from the int8 weight, with each row's `top` largest
    recomputed from the exact weight."""
    logits = approx.matmul(hidden)
    best = logits.topk(min(top, logits.shape[-1]), dim=-1).indices  # [T, top]
    rows = exact.rows(best.flatten()).view(*best.shape, -1)  # [T, top, K]
    logits.scatter_(-1, best, torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1))
    return logits


def rescored_top(hidden: torch.Tensor, approx: Int8Packed, exact: QuantParts,
                 top: int = RESCORE_TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, K] -> (values [T, top], token ids [T, top]): each row's `top` best tokens
    by the int8 weight with their exact values, the vocabulary taken chunk by chunk so no
    [T, N] logits are ever held (60 decode rows: 63 MiB of float32 otherwise). The tokens
    are those `rescored_logits` re-scores."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    values, ids, col = [], [], 0
    for packed in approx.chunks:
        y = approx.chunk_matmul(flat, packed)
        v, i = y.topk(min(top, y.shape[1]), dim=-1)
        values.append(v)
        ids.append(i + col)
        col += y.shape[1]
    cand_v, cand_i = torch.cat(values, 1), torch.cat(ids, 1)
    best = cand_i.gather(1, cand_v.topk(min(top, cand_v.shape[1]), dim=-1).indices)  # [T, top]
    rows = exact.rows(best.flatten()).view(*best.shape, -1)  # [T, top, K]
    return torch.bmm(rows.float(), flat.float().unsqueeze(-1)).squeeze(-1), best


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere), so
    what a load parsed or converted and dropped does not stay in the process's RSS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  # NOTE: glibc only
    except (OSError, AttributeError):
        return None
    return libc


def cap_heap_reuse() -> None:
    """Where `LLMQL_MMAP_THRESHOLD` (bytes) is set, serve allocations of that size and up
    from fresh memory maps, returned to the OS when freed (glibc `mallopt(M_MMAP_THRESHOLD)`).
    Off by default: at 256 KiB it cut the default model's peak RSS by ~80 MiB but every
    step's activations then page-faulted afresh (system time 5 -> 38 s, rows/s -25-30% on a
    60-prompt run, measured 2026-12-04); the runner trims the heap every few steps instead
    (`ModelRunner.trim_every`)."""
    from llmql.settings import env_int

    threshold = env_int("LLMQL_MMAP_THRESHOLD", 0)
    libc = _libc()
    if threshold > 0 and libc is not None:
        libc.mallopt(-3, threshold)  # NOTE: -3 is M_MMAP_THRESHOLD


def int8_gemm_wanted() -> bool:
    """The int8 GEMM runs here and `LLMQL_INT8_GEMM` is not "0"."""
    return os.environ.get("LLMQL_INT8_GEMM", "1") != "0" and int8_linear_available()


def onednn_head() -> bool:
    """Whether the LM head's int8 copy is oneDNN's (CPUs with AMX, where it runs ~2.5x
    FBGEMM's at 60 rows) rather than FBGEMM's."""
    return amx_available() and onednn_int8_available()


def on_cpu(model: nn.Module) -> bool:
    """Whether every parameter of `model` is on the CPU (or a `meta` placeholder)."""
    return all(p.device.type in ("cpu", "meta") for p in model.parameters())


def int8_enabled(model: nn.Module) -> bool:
    """Whether `finalize_quantized` moves this model's matmuls to the int8 GEMM (CPU only)."""
    return on_cpu(model) and int8_gemm_wanted()


def _matmul(x: torch.Tensor, w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return quant_matmul(x, w.qweight, w.scales, w.zeros, bits=w.bits, group=w.group, offset=w.offset,
                        dtype=dtype)


def load_quant(module: nn.Module, weight: QuantWeight, start: int = 0) -> None:
    """Give `module` (whose `weight` is [N, K]) the rows of `weight` from row `start`."""
    if getattr(module, "quant", None) is None:
        module.quant = QuantParts(tuple(module.weight.shape))  # type: ignore[assignment]
    module.quant.add(start, weight.to(module.weight.device))  # type: ignore[union-attr]


LAYER_MODES = ("exact", "grouped", "bf16", "int8", "float")


def finalize_quantized(model: nn.Module, *, layers: str = "exact") -> int:
    """After loading: stack parts, tie the LM head, free float placeholders. Where the int8
    GEMM runs, the LM head gets its int8 copy (re-scored exactly, see `rescored_logits`).
    `layers` says how the other linears run: "exact" (group-wise, dequantising tile by tile
    at each call), "grouped" (the same with 4-bit values widened to int8, for a cheaper
    dequantisation on CPU; on the C kernel of kernels/cpu_gemm.py where it runs (AVX-512, else
    its AVX2 build: `kernel_available`), with 4-bit values kept 4-bit:
    `QuantParts.use_cpu_kernel`), "bf16" ("grouped" with bfloat16 tiles and GEMMs, for CPUs with
    AMX: `amx_available`), "int8" (the int8 GEMM, activations compensated) or "float"
    (dequantised once to float32: exact, 4 bytes per weight). Where the CPU has AMX, the LM
    head's int8 copy is oneDNN's (`Int8Packed(onednn=True)`), else FBGEMM's.
    Returns the number of quantized layers."""
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    quantized = [m for m in model.modules() if getattr(m, "quant", None) is not None]
    for module in quantized:
        module.quant.finalize()  # type: ignore[union-attr]
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is not None and head is not None and head.weight is embed.weight and embed.quant is not None:
        head.quant = embed.quant
        quantized.append(head)
    int8 = bool(quantized) and int8_enabled(model)
    cpu_kernel = layers == "grouped" and on_cpu(model) and kernel_available("llmql_grouped_gemm")
    for module in quantized:
        w = module.weight
        if layers == "float" and module is not embed and module is not head:
            weight = torch.cat([part.dequantize() for _, part in module.quant.parts])  # type: ignore[union-attr]
            module.weight = nn.Parameter(weight.to(w.dtype), requires_grad=False)
            module.quant = None
            continue
        module.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
        if layers in ("grouped", "bf16") and module is not embed and module is not head:
            if cpu_kernel:  # NOTE: 4-bit values stay 4-bit there
                module.quant.use_cpu_kernel()  # type: ignore[union-attr]
            else:
                module.quant.parts = [(s, part.widened()) for s, part in module.quant.parts]  # type: ignore[union-attr]
            if layers == "bf16":
                module.quant.dtype = torch.bfloat16  # type: ignore[union-attr]
        if int8 and module is head:
            module.int8 = Int8Packed(module.quant, onednn=onednn_head())  # type: ignore[union-attr]
        elif int8 and layers == "int8" and module is not embed:
            module.quant.use_int8()  # type: ignore[union-attr]
    trim_heap()
    return sum(m.quant is not None for m in quantized)


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by quantized weights (each shared weight counted once)."""
    seen = {id(m.quant): m.quant.nbytes for m in model.modules() if getattr(m, "quant", None) is not None}
    heads = [m.int8.nbytes for m in model.modules() if getattr(m, "int8", None) is not None]
    return sum(seen.values()) + sum(heads)
