"""What runs inside Spark's Python workers: one engine per worker, the udfs executor per batch.

The driver captures a `WorkerContext` (settings, optional engine factory) in each UDF's
closure; workers rebuild nothing else. Engines come from the process's one registry
(`llmql.udfs.engines`), keyed by model and engine settings, so a reused Python worker loads
the model once across tasks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmql.engine import is_remote
from llmql.engine.chat import has_chat_template
from llmql.engine.types import Engine, EngineStats, GenerationRequest, GenerationResult
from llmql.settings import Settings, get_settings, override
from llmql.udfs import engines
from llmql.udfs.batch import submit_request
from llmql.udfs.call import CallSpec
from llmql.udfs.engines import EngineFactory
from llmql.udfs.run import run_spec
from llmql.udfs.types import CallOutput, CallReport

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

def use_engine(engine_factory: EngineFactory | None) -> None:
    """Set the engine factory that `llmql.spark` uses when none is passed (None = the
    settings' model loaded in each worker)."""
    _DEFAULT_FACTORY[0] = engine_factory


def default_engine_factory() -> EngineFactory | None:
    """The factory set by `use_engine` (None = load the settings' model)."""
    return _DEFAULT_FACTORY[0]


def get_engine(ctx: WorkerContext) -> Engine:
    """This process's engine for `ctx`, loaded on first use and reused across tasks."""
    with override(**_settings_dict(ctx.settings)):
        return engines.get_engine(ctx.settings.model, factory=ctx.engine_factory)


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
        """The result-cache identity: the model as named, but a remote endpoint by its URL
        and served model id (asked of the server), as the DuckDB path keys it."""
        model = self._ctx.settings.model
        if self._ctx.engine_factory is None and is_remote(model):
            return str(get_engine(self._ctx).model_name)
        return model

    @property
    def serves_chat_template(self) -> bool:
        """Whether the engine's model has a chat template (loads the engine)."""
        return has_chat_template(get_engine(self._ctx))

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


def _with_model(ctx: WorkerContext, model: str | None) -> WorkerContext:
    """`ctx` loading `model` instead (a call's `model` option), else unchanged."""
    if not model or model == ctx.settings.model:
        return ctx
    return dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, model=model))


def _empty(spec: CallSpec) -> pa.Array:
    spec.validate()
    return pa.array([], type=spec.arrow_type)


def _settings_dict(settings: Settings) -> dict[str, object]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}

