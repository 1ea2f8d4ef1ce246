"""One loaded engine per model name per process, shared by every call and connection."""

from __future__ import annotations

import threading

from llmql.engine.types import Engine
from llmql.settings import get_settings


class EngineUnavailable(RuntimeError):
    """The embedded engine could not be loaded (not installed yet, or the model failed)."""


_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def get_engine(model: str | None = None) -> Engine:
    """The process's engine for `model` (None = settings.model), loaded on first use."""
    name = model or get_settings().model
    with _LOCK:
        if name not in _ENGINES:
            _ENGINES[name] = _load(model)
        return _ENGINES[name]


def loaded_engine(model: str | None = None) -> Engine | None:
    """The process's engine for `model` if it is already loaded (never loads one)."""
    with _LOCK:
        return _ENGINES.get(model or get_settings().model)


def _load(model: str | None) -> Engine:
    try:
        from llmql.engine import load
    except ImportError as exc:
        raise EngineUnavailable(
            "the embedded engine (llmql.engine.load) is not available in this build"
        ) from exc
    return load(model) if model else load()
