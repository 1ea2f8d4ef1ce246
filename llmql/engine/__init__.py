"""The embedded inference engine: `load()` gives an `Engine` (see `llmql.engine.types`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmql.engine.types import Engine, EngineStats, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from llmql.engine.engine import EmbeddedEngine


def load(model: str | None = None, *, policy: str | None = None,
         **settings: object) -> EmbeddedEngine:
    """Load `model` into the embedded engine (see `llmql.engine.engine.load`)."""
    from llmql.engine.engine import load as _load

    return _load(model, policy=policy, **settings)


__all__ = ["Engine", "EngineStats", "GenerationRequest", "GenerationResult", "load"]
