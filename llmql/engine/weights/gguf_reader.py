"""A minimal GGUF (v2/v3) reader: metadata as Python values, tensors as memory-mapped bytes.

`gguf.GGUFReader` builds a numpy view per array element, which takes ~15 s on a 262k-token
vocabulary; this reader parses the same header in well under a second. Dequantisation still
uses `gguf.quants.dequantize`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# NOTE: GGUF value type -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: GGUF dims (fastest-varying first), ggml type, and its raw bytes."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    data: np.ndarray  # uint8 [rows, bytes per row], memory-mapped

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy/torch shape (dims reversed)."""
        return tuple(reversed(self.dims))


def read_gguf(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensors) of a GGUF file; ValueError if it is not one."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    if bytes(raw[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    reader = _Cursor(raw, 24)
    metadata = {reader.string(): reader.value(reader.u32()) for _ in range(n_kv)}
    infos = []
    for _ in range(n_tensors):
        name = reader.string()
        dims = tuple(struct.unpack_from(f"<{reader.u32()}Q", raw, reader.pos))
        reader.pos += 8 * len(dims)
        ggml_type, offset = struct.unpack_from("<IQ", raw, reader.pos)
        reader.pos += 12
        infos.append((name, dims, ggml_type, offset))
    align = int(metadata.get("general.alignment", 32))
    start = -(-reader.pos // align) * align
    tensors = []
    for name, dims, ggml_type, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin = start + offset
        data = buf[begin : begin + rows * row_bytes].reshape(rows, row_bytes)
        tensors.append(TensorInfo(name, dims, ggml_type, data))
    return metadata, tensors


class _Cursor:
    """Sequential little-endian decoding of GGUF metadata values."""

    def __init__(self, raw: memoryview, pos: int) -> None:
        self.raw, self.pos = raw, pos

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.raw, self.pos)
        self.pos += 4
        return value

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.raw, self.pos)
        start = self.pos + 8
        self.pos = start + length
        return bytes(self.raw[start : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = self.u32()
            (count,) = struct.unpack_from("<Q", self.raw, self.pos)
            self.pos += 8
            if item_kind in _SCALARS:
                dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder("<")
                values = np.frombuffer(self.raw, dtype=dtype, count=count, offset=self.pos)
                self.pos += values.nbytes
                return values.tolist()
            return [self.value(item_kind) for _ in range(count)]
        fmt, _ = _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += struct.calcsize(fmt)
        return value
