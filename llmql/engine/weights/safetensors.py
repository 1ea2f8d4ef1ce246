"""Reading (and writing) HF-named tensors from `*.safetensors` files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def iter_safetensors(
    directory: Path, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from the checkpoint's `*.safetensors` files (memory-mapped): those
    the `model.safetensors.index.json` names, else all but Mistral's `consolidated*` copies.
    `keep(name)` False skips a tensor without reading it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
    else:
        files = [p for p in sorted(directory.glob("*.safetensors")) if not p.name.startswith("consolidated")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` to one safetensors file (atomically: temp file, then rename)."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.rename(path)
