"""GGUF tensors as the engine keeps them: quantized types as `QuantWeight` (no float32 copy),
float types as tensors; and the load-time quantization of float checkpoints.

Tensors are converted one at a time (streamed), and each tensor's file pages are handed
back to the OS after conversion, so peak memory during a load stays near the final size.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from llmql.engine.config import ModelConfig
from llmql.engine.weights.gguf import _ROPE_FREQS, GGUFFile, _dequantise, _undo_llama_cpp, hf_name
from llmql.engine.weights.gguf_reader import TensorInfo
from llmql.engine.weights.quant import SUPPORTED_GGUF_TYPES, QuantWeight, from_gguf, quantize

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4")
Loaded = torch.Tensor | QuantWeight


def iter_gguf(gguf: GGUFFile, config: ModelConfig, mode: str = "auto", *,
              embedding_in_file: bool = False) -> Iterator[tuple[str, Loaded]]:
    """Yield (HF name, tensor or QuantWeight) for every tensor of `gguf`.

    2-D tensors of a type in `SUPPORTED_GGUF_TYPES` stay quantized; others are dequantised
    to float32 (and, with `mode` "int8"/"int4", 2-D ones quantized to that). With
    `embedding_in_file`, a quantized token embedding (and output head) stays in the file
    (`FileQuantWeight`: the int8 GEMM's copy serves full logits, the file the rows).
    """
    for t in gguf._tensors:
        if t.name == _ROPE_FREQS:
            continue
        name = hf_name(t.name, config)
        if embedding_in_file and t.name in _IN_FILE and t.ggml_type in _FILE_TYPES:
            yield name, FileQuantWeight(t.data, t.ggml_type, t.shape[1])
            continue
        weight = _quantized(t, config) if len(t.dims) == 2 else None
        if weight is None:
            tensor = torch.from_numpy(_undo_llama_cpp(_dequantise(t), t.name, config))
            weight = quantize(tensor, mode) if mode in ("int8", "int4") and tensor.dim() == 2 else tensor
        _release(t)
        yield name, weight


def quantize_stream(tensors: Iterable[tuple[str, torch.Tensor]], mode: str) -> Iterator[tuple[str, Loaded]]:
    """Quantize every 2-D float tensor of a checkpoint stream ("int8"/"int4"); pass the rest."""
    for name, tensor in tensors:
        if mode in ("int8", "int4") and tensor.dim() == 2 and tensor.is_floating_point():
            yield name, quantize(tensor, mode)
        else:
            yield name, tensor


def _quantized(t: TensorInfo, config: ModelConfig) -> QuantWeight | None:
    shape = t.shape
    weight = _convert_rows(t, shape[0], shape[1])
    if weight is None:
        return None
    if config.model_type in ("llama", "mistral") and (".attn_q." in t.name or ".attn_k." in t.name):
        # NOTE: undo llama.cpp's Q/K row permutation by permuting whole rows.
        heads = config.num_heads if ".attn_q." in t.name else config.num_kv_heads
        index = np.arange(shape[0])
        half = shape[0] // heads // 2
        order = index.reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)
        weight = weight.select_rows(torch.from_numpy(order))
    return weight


def _convert_rows(t: TensorInfo, n: int, k: int, chunk_bytes: int = 16 << 20) -> QuantWeight | None:
    """`from_gguf` over chunks of rows written into the final tensors (no transient copy of
    a large tensor such as a 262k-row embedding); file pages are released chunk by chunk."""
    rows = max(1, chunk_bytes // max(1, t.data.shape[1]))
    if rows >= n:
        return from_gguf(t.data, t.ggml_type, (n, k))
    first = from_gguf(t.data[:rows], t.ggml_type, (rows, k))
    if first is None:
        return None
    out = QuantWeight(_grow(first.qweight, n), _grow(first.scales, n),
                      None if first.zeros is None else _grow(first.zeros, n),
                      first.bits, first.group, first.offset)
    for start in range(rows, n, rows):
        end = min(n, start + rows)
        part = from_gguf(t.data[start:end], t.ggml_type, (end - start, k))
        assert part is not None
        out.qweight[start:end] = part.qweight
        out.scales[start:end] = part.scales
        if out.zeros is not None and part.zeros is not None:
            out.zeros[start:end] = part.zeros
        _release_array(t.data[start:end])
    return out


class FileQuantWeight:
    """A quantized GGUF tensor left in its file: rows are read (`os.preadv` into buffers this
    process owns) and converted when asked for (an embedding lookup, the LM head's re-scored
    tokens). Reading, not touching the memory map, keeps the file's pages out of this
    process's RSS: a page fault on a cached file maps its neighbours too (fault-around), so
    lookups scattered over a 262k-row embedding made nearly all of it resident. Duck-types
    the parts of `QuantWeight` that `QuantParts` uses."""

    def __init__(self, data: np.ndarray, ggml_type: int, k: int) -> None:
        root = _root(data)
        self._file = open(root.filename, "rb", buffering=0)  # noqa: SIM115  (lives with self)
        self._offset = int(getattr(root, "offset", 0)) + data.ctypes.data - root.ctypes.data
        self._rows, self._row_bytes = data.shape  # uint8 [N, bytes per row]
        self.ggml_type = ggml_type
        self.k = k

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows, self.k

    nbytes = 0  # NOTE: read from the file when used

    def layout(self) -> tuple:
        return ("file", self.ggml_type, self.k)

    def select_rows(self, index: torch.Tensor | slice) -> QuantWeight:
        """The rows `index` as an in-memory `QuantWeight`."""
        if isinstance(index, slice):
            start, stop, step = index.indices(self._rows)
            index = torch.arange(start, stop, step)
        rows = self.read_rows(index.cpu().numpy().astype(np.int64, copy=False))
        weight = from_gguf(rows, self.ggml_type, (rows.shape[0], self.k))
        assert weight is not None
        return weight

    def read_rows(self, index: np.ndarray) -> np.ndarray:
        """Raw bytes uint8 [len(index), bytes per row] of rows `index` (any order, repeats
        allowed): each run of consecutive distinct rows is one `preadv`."""
        if index.size and (index.min() < 0 or index.max() >= self._rows):
            raise IndexError(f"rows out of range for a tensor of {self._rows} rows")
        unique, inverse = np.unique(index, return_inverse=True)
        out = np.empty((unique.size, self._row_bytes), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        fd = self._file.fileno()
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, unique.size]):
            view = memoryview(out[lo:hi]).cast("B")
            offset = self._offset + int(unique[lo]) * self._row_bytes
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"short read from {self._file.name} at {offset + done}")
                done += n
        return out if np.array_equal(unique, index) else out[inverse.reshape(-1)]

    def dequantize(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """float32 [n, K] of `rows`."""
        return self.select_rows(rows).dequantize()

    def to(self, device: str | torch.device) -> FileQuantWeight:
        if torch.device(device).type != "cpu":
            raise ValueError("a file-backed weight stays on the CPU")
        return self


_IN_FILE = ("token_embd.weight", "output.weight")
_FILE_TYPES = frozenset(int(GGMLQuantizationType[name]) for name in SUPPORTED_GGUF_TYPES)


def _grow(first: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
    out[: first.shape[0]] = first
    return out


def _release(t: TensorInfo) -> None:
    """Drop the resident file pages of a converted tensor (they are re-read if needed)."""
    _release_array(t.data)


def _root(data: np.ndarray) -> np.ndarray:
    """The array (a `np.memmap` of the whole file) `data` is a view of."""
    root = data
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


def _release_array(data: np.ndarray) -> None:
    root = _root(data)
    mapped = getattr(root, "_mmap", None)
    if mapped is None or not hasattr(mapped, "madvise") or data.size == 0:
        return
    page = mmap.PAGESIZE
    start = data.ctypes.data - root.ctypes.data
    begin = start // page * page
    try:
        mapped.madvise(mmap.MADV_DONTNEED, begin, start + data.nbytes - begin)
    except (OSError, ValueError):  # NOTE: advice only; a platform may refuse it
        log.debug("madvise refused")
