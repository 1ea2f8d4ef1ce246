"""The embedded inference engine: `load()` gives an `Engine` (see `llmql.engine.types`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmql.engine.types import Engine, EngineStats, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from llmql.engine.engine import EmbeddedEngine
    from llmql.engine.remote import RemoteEngine


def load(model: str | None = None, *, policy: str | None = None,
         **settings: object) -> EmbeddedEngine | RemoteEngine:
    """Load `model` into the embedded engine (see `llmql.engine.engine.load`), or connect
    to an OpenAI-compatible endpoint when `model` (else LLMQL_MODEL) is an "http(s)://" URL
    (see `llmql.engine.remote.load_remote`; `policy` is then the server's business)."""
    from llmql.settings import get_settings

    source = model or get_settings().model
    if is_remote(source):
        from llmql.engine.remote import load_remote

        return load_remote(source, **settings)
    from llmql.engine.engine import load as _load

    return _load(model, policy=policy, **settings)


def is_remote(model: str | None) -> bool:
    """Whether a model name is an OpenAI-compatible endpoint URL ("http(s)://...")."""
    return isinstance(model, str) and model.startswith(("http://", "https://"))


__all__ = ["Engine", "EngineStats", "GenerationRequest", "GenerationResult", "is_remote", "load"]
