"""What runs inside Spark's Python workers: one engine per worker, the udfs executor per batch.

The driver captures a `WorkerContext` (settings, optional engine factory) in each UDF's
closure; workers rebuild nothing else. Engines are cached at module level, keyed by model
and engine settings, so a reused Python worker loads the model once across tasks.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmql.engine.types import Engine, EngineStats, GenerationRequest, GenerationResult
from llmql.settings import Settings, get_settings, override
from llmql.udfs.aggregate import run_spec
from llmql.udfs.batch import submit_request
from llmql.udfs.types import CallOutput, CallReport, CallSpec

EngineFactory = Callable[[], Engine]

_ENGINES: dict[tuple, Engine] = {}
_LOCK = threading.Lock()
_DEFAULT_FACTORY: list[EngineFactory | None] = [None]


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs from the driver: settings and how to get an engine.

    Args:
        settings: the driver's settings (model, cache dir, device, threads, KV size...).
        engine_factory: a picklable zero-argument callable returning an Engine (tests,
            HTTP backends); None loads `settings.model` with `llmql.engine.load`.
    """

    settings: Settings
    engine_factory: EngineFactory | None = None

    @classmethod
    def capture(
        cls, engine_factory: EngineFactory | None = None, *, workers: int = 0, **changes: object
    ) -> WorkerContext:
        """The driver's current settings (with `changes`), for shipping to workers.

        When `threads` is 0 and `workers` > 0, each worker gets an equal share of the
        driver's cores so local workers do not oversubscribe the CPU.
        """
        engine_factory = engine_factory or default_engine_factory()
        settings = dataclasses.replace(get_settings(), **changes)
        if settings.threads == 0 and workers > 0:
            share = max(1, (os.cpu_count() or 1) // workers)
            settings = dataclasses.replace(settings, threads=share)
        return cls(settings, engine_factory)

    def engine_key(self) -> tuple:
        """Identity of the engine this context loads (model + engine settings)."""
        s = self.settings
        return (s.model, s.device, s.threads, s.kv_tokens, s.kv_gib, _factory_key(self.engine_factory))


def use_engine(engine_factory: EngineFactory | None) -> None:
    """Set the engine factory that `llmql.spark` uses when none is passed (None = the
    settings' model loaded in each worker)."""
    _DEFAULT_FACTORY[0] = engine_factory


def default_engine_factory() -> EngineFactory | None:
    """The factory set by `use_engine` (None = load the settings' model)."""
    return _DEFAULT_FACTORY[0]


def get_engine(ctx: WorkerContext) -> Engine:
    """This process's engine for `ctx`, loaded on first use and reused across tasks."""
    key = ctx.engine_key()
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _load(ctx)
        return _ENGINES[key]


def run_batch(ctx: WorkerContext, spec: CallSpec, table: pa.Table) -> CallOutput:
    """Run one call over an Arrow table with the driver's settings in force."""
    ctx = _with_model(ctx, spec.options.model)
    with override(**_settings_dict(ctx.settings)):
        if table.num_rows == 0:
            return CallOutput(_empty(spec), CallReport())
        return run_spec(spec, table, engine=_LazyEngine(ctx), progress=False)


def run_sql_udf(
    ctx: WorkerContext, function: str, options: dict, args: tuple, collector: Any = None
) -> pa.Array:
    """Evaluate a SQL UDF batch with the DuckDB connector's argument conventions; the
    batch's CallReport goes to `collector.add` when given."""
    from llmql.udfs.vectorized import make_udf

    ctx = _with_model(ctx, options.get("model"))
    with override(**_settings_dict(ctx.settings)):
        udf = make_udf(function, options, engine=_LazyEngine(ctx), collector=collector)
        return udf(*args)


class _LazyEngine:
    """Defers loading until the executor generates, so fully cached batches load nothing."""

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx

    @property
    def model_name(self) -> str:
        return self._ctx.settings.model

    def generate(
        self, requests: Sequence[GenerationRequest], *, progress: bool = False
    ) -> list[GenerationResult]:
        return get_engine(self._ctx).generate(requests, progress=progress)

    def submit(self, request: GenerationRequest, *, on_text=None) -> Future[GenerationResult]:
        return submit_request(get_engine(self._ctx), request)

    def cancel(self, futures: Iterable[Future]) -> None:
        engine = get_engine(self._ctx)
        if hasattr(engine, "cancel"):
            engine.cancel(futures)

    def stats(self) -> EngineStats:
        return get_engine(self._ctx).stats()


def _load(ctx: WorkerContext) -> Engine:
    if ctx.engine_factory is not None:
        return ctx.engine_factory()
    from llmql.engine import load

    with override(**_settings_dict(ctx.settings)):
        model = ctx.settings.model
        return load(None if model == "default" else model)


def _with_model(ctx: WorkerContext, model: str | None) -> WorkerContext:
    """`ctx` loading `model` instead (a call's `model` option), else unchanged."""
    if not model or model == ctx.settings.model:
        return ctx
    return dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, model=model))


def _empty(spec: CallSpec) -> pa.Array:
    from llmql.udfs.functions import validate

    return pa.array([], type=validate(spec).arrow_type(spec.options))


def _settings_dict(settings: Settings) -> dict[str, object]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _factory_key(factory: EngineFactory | None) -> str | None:
    if factory is None:
        return None
    if hasattr(factory, "__qualname__"):
        return f"{factory.__module__}.{factory.__qualname__}"
    return f"{type(factory).__module__}.{type(factory).__qualname__}:{factory!r}"
