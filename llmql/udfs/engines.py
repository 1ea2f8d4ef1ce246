"""The process's engine registry: one loaded engine per model and engine settings, shared by
every call, connection and (in a Spark Python worker) every task."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from llmql.engine import load
from llmql.engine.types import Engine
from llmql.settings import get_settings

EngineFactory = Callable[[], Engine]

_ENGINES: dict[Hashable, Engine] = {}
_LOCK = threading.Lock()


def get_engine(model: str | None = None, *, factory: EngineFactory | None = None) -> Engine:
    """The process's engine for `model` (None = settings.model), loaded on first use.

    Args:
        model: the model to load with `llmql.engine.load`.
        factory: a zero-argument callable that builds the engine instead (tests, remote
            backends shipped to Spark workers); its engine is cached like a loaded one.
    """
    key = engine_key(model, factory)
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = factory() if factory is not None else load(key[0])
        return _ENGINES[key]


def loaded_engine(model: str | None = None) -> Engine | None:
    """The process's engine for `model` if it is already loaded (never loads one)."""
    with _LOCK:
        return _ENGINES.get(engine_key(model))


def engine_key(model: str | None = None, factory: EngineFactory | None = None) -> tuple:
    """The registry key: the model name, the settings `load` reads (device, threads, KV,
    policy) and the factory's identity."""
    s = get_settings()
    return (model or s.model, s.device, s.threads, s.kv_tokens, s.kv_gib, s.policy,
            _factory_key(factory))


def _factory_key(factory: EngineFactory | None) -> str | None:
    if factory is None:
        return None
    if hasattr(factory, "__qualname__"):
        return f"{factory.__module__}.{factory.__qualname__}"
    return f"{type(factory).__module__}.{type(factory).__qualname__}:{factory!r}"
