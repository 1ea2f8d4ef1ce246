"""The backing tier of expert offload: every expert's weights, left in the model's safetensors
files (a GGUF model's are its dequantised cache files) and read only when loaded.

NOTE: an expert is read with `os.preadv` straight into the cache's buffers, not through a
memory map: mapped file pages count in the process's RSS once touched, and a plain read does
no torch work, so the prefetch thread does not start a second OpenMP team that spins against
the compute threads (on 2 cores that made prefetching runs ~7x slower). The OS page cache
still keeps hot file pages, outside our RSS.

An expert is (w13 [2I, H] gate rows then up rows, w2 [H, I]), in the model dtype. On CUDA the
backing tier is pinned host memory instead (copied from the files once, at load).
"""

from __future__ import annotations

import json
import os
import re
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from llmql.engine.config import ModelConfig
from llmql.engine.layers.moe import EXPERT_PARTS, EXPERT_TENSOR

Expert = tuple[torch.Tensor, torch.Tensor]
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class _Slice:
    """One tensor's bytes inside a file."""

    file: int
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ExpertStore:
    """Every expert of every MoE layer, in the model files; `load` reads one into tensors.

    Raises ValueError at construction for a missing, truncated or mis-shaped expert tensor.
    Set `drop_page_cache` to drop each expert's file pages from the OS page cache after
    reading it, so every read goes to the disk, as for a model bigger than RAM (benchmarks).
    """

    drop_page_cache: bool = False

    def __init__(self, directory: Path, config: ModelConfig, dtype: torch.dtype,
                 pin_memory: bool = False) -> None:
        self.config, self.dtype = config, dtype
        c = config
        self.shapes = {"gate": (c.moe_intermediate_size, c.hidden_size),
                       "up": (c.moe_intermediate_size, c.hidden_size),
                       "down": (c.hidden_size, c.moe_intermediate_size)}
        self._fds: list[int] = []
        weakref.finalize(self, _close_all, self._fds)
        self._parts: dict[tuple[int, int, str], _Slice] = {}
        for path in _safetensors_files(directory):
            self._index(path)
        self._check_complete()
        self._pinned: dict[tuple[int, int], Expert] | None = None
        if pin_memory:
            self._pinned = {k: tuple(t.pin_memory() for t in self.load(*k)) for k in self.keys()}  # type: ignore[misc]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the model dtype."""
        return sum(a * b for a, b in self.shapes.values()) * self.dtype.itemsize

    def keys(self) -> list[tuple[int, int]]:
        """Every (layer, expert)."""
        return [(layer, e) for layer in range(self.config.num_layers)
                for e in range(self.config.num_experts)]

    def load(self, layer: int, expert: int, out: Expert | None = None) -> Expert:
        """One expert (model dtype, CPU), read into `out` (reused buffers) or fresh tensors.
        On CUDA: the pinned host copy itself."""
        if self._pinned is not None:
            return self._pinned[(layer, expert)]
        if out is None:
            i, h = self.shapes["gate"]
            out = torch.empty(2 * i, h, dtype=self.dtype), torch.empty(h, i, dtype=self.dtype)
        w13, w2 = out
        half = w13.shape[0] // 2
        self._read(self._parts[(layer, expert, "gate")], w13[:half])
        self._read(self._parts[(layer, expert, "up")], w13[half:])
        self._read(self._parts[(layer, expert, "down")], w2)
        return out

    def will_need(self, layer: int, expert: int) -> None:
        """Read-ahead hint: the kernel starts reading the expert's file pages into the OS page
        cache now (asynchronously), so a later `load` copies them instead of waiting on the
        disk; with several loads queued, the disk works on them while the loading thread
        copies. The pages stay outside our RSS (page cache, not mapped). No-op on CUDA."""
        if self._pinned is not None:
            return
        for part in ("gate", "up", "down"):
            s = self._parts[(layer, expert, part)]
            os.posix_fadvise(self._fds[s.file], s.start, s.end - s.start, os.POSIX_FADV_WILLNEED)

    def _read(self, s: _Slice, into: torch.Tensor) -> None:
        """The tensor's file bytes into `into` (converted when the file's dtype differs)."""
        target = into if into.dtype == s.dtype else torch.empty(s.shape, dtype=s.dtype)
        view = memoryview(target.view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fds[s.file], [view[done:]], s.start + done)
            if n <= 0:
                raise ValueError(f"expert tensor bytes {s.start}..{s.end} could not be read "
                                 "(file truncated since the model was loaded?)")
            done += n
        if self.drop_page_cache:
            os.posix_fadvise(self._fds[s.file], s.start, s.end - s.start, os.POSIX_FADV_DONTNEED)
        if target is not into:
            into.copy_(target)

    def _index(self, path: Path) -> None:
        size = path.stat().st_size
        header, data_start = _read_header(path, size)
        file_id = len(self._fds)
        for name, meta in header.items():
            match = EXPERT_TENSOR.match(name)
            if name == "__metadata__" or match is None:
                continue
            layer = _LAYER.search(name)
            if layer is None:
                raise ValueError(f"{path}: expert tensor {name!r} names no layer")
            part = EXPERT_PARTS[match.group(3)]
            begin, end = (data_start + int(o) for o in meta["data_offsets"])
            self._parts[(int(layer.group(1)), int(match.group(2)), part)] = self._slice(
                path, name, file_id, begin, end, meta, size, part)
        self._fds.append(os.open(path, os.O_RDONLY))

    def _slice(self, path: Path, name: str, file_id: int, begin: int, end: int, meta: dict,
               size: int, part: str) -> _Slice:
        """Validate one expert tensor's header entry (dtype, shape, byte range)."""
        dtype = _DTYPES.get(meta.get("dtype"))
        shape = tuple(meta.get("shape", ()))
        if dtype is None:
            raise ValueError(f"{path}: expert tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        if shape != self.shapes[part]:
            raise ValueError(f"{path}: expert tensor {name!r} has shape {shape}, expected {self.shapes[part]}")
        if end - begin != shape[0] * shape[1] * dtype.itemsize or end > size:
            raise ValueError(f"{path}: expert tensor {name!r} is truncated or corrupt "
                             f"(bytes {begin}..{end} of a {size}-byte file)")
        return _Slice(file_id, begin, end, dtype, shape)

    def _check_complete(self) -> None:
        missing = [(layer, e, p) for layer, e in self.keys() for p in ("gate", "up", "down")
                   if (layer, e, p) not in self._parts]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} expert tensors (layer, expert, part), "
                             f"e.g. {missing[:3]}; stacked expert tensors cannot be offloaded")


def is_expert_tensor(name: str) -> bool:
    """Whether a checkpoint tensor is a per-expert weight (kept in the backing tier)."""
    return EXPERT_TENSOR.match(name) is not None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return [p for p in sorted(directory.glob("*.safetensors")) if not p.name.startswith("consolidated")]


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file; ValueError if malformed."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ValueError(f"{path}: safetensors header runs past the end of the file (truncated)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt safetensors header ({exc})") from exc
    return header, 8 + length
