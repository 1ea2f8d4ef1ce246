"""The batch executor: one LLM call over a table of inputs, end to end.

Stable entry point for every connector (DuckDB, pandas, Spark executors)::

    from llmql.udfs.executor import CallSpec, CallOptions, run_call
    spec = CallSpec("llm_filter", "Is this movie suitable for kids?",
                    ("movie_info", "review_content"), CallOptions(max_tokens=2))
    out = run_call(spec, arrow_table)      # out.values: pa.Array aligned with the rows
    out.report                             # CallReport: llm_calls, cache_hits, tokens, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from llmql.engine import is_remote
from llmql.engine.types import Engine
from llmql.ordering import reorder
from llmql.settings import get_settings
from llmql.udfs.batch import BatchRunner, PendingPrompt
from llmql.udfs.call import CallSpec
from llmql.udfs.engines import get_engine
from llmql.udfs.fingerprint import model_fingerprint
from llmql.udfs.functions import FunctionSpec, calibrates, validate
from llmql.udfs.prompts import cache_key, null_prompt, output_signature, render_prompt
from llmql.udfs.result_cache import ResultCache, default_cache
from llmql.udfs.types import CallOptions, CallOutput, CallReport, OutputParseError, UDFError

__all__ = ["CallOptions", "CallOutput", "CallReport", "CallSpec", "run_call"]

_DEFAULT = object()


def run_call(
    spec: CallSpec,
    inputs: pa.Table,
    *,
    engine: Engine | None = None,
    cache: ResultCache | object | None = _DEFAULT,
    progress: bool | None = None,
) -> CallOutput:
    """Run one LLM call over `inputs` and return one typed value per input row.

    Rows with a NULL argument give NULL without a model call. Identical rows are answered once.
    Distinct rows are ordered by `llmql.ordering.reorder` (rows and per-row field order) for
    prefix reuse, looked up in the result cache, and the misses sent to the engine in chunks
    of `spec.options.chunk_size`, each chunk cached as soon as it finishes. Calls with choices
    at temperature 0 are calibrated (`CallOptions.calibrate`): one extra content-free prompt.

    Args:
        spec: the function, its constant instruction, the prompt fields (columns of
            `inputs`) and options (`llm_agg` is not a row function; use `run_agg`).
        inputs: an Arrow table (or anything `pa.table` accepts) holding `spec.fields`.
        engine: the engine to use; None loads the shared one for `spec.options.model`.
        cache: a ResultCache, None to disable caching, default the process's cache
            (`<cache_dir>/results.sqlite`, unless settings or options disable it).
        progress: show a progress bar on long runs (None = settings.progress).

    Returns:
        CallOutput(values, report): `values` is a pa.Array of the function's type (BOOLEAN
        for llm_filter, INT64 for llm_score, STRUCT for llm_extract, else STRING), aligned
        with `inputs`; unparseable answers and failed prompts are NULL and counted.

    Raises:
        UDFError: bad spec or options, or fields missing from `inputs` (before any model call).
        OutputParseError: an unparseable answer when `spec.options.on_error == "raise"`.
    """
    if spec.function == "llm_agg":
        raise UDFError("llm_agg is an aggregate; use llmql.udfs.aggregate.run_agg")
    fn = validate(spec)
    table = _as_table(inputs, spec.fields)
    report = CallReport(rows=table.num_rows)
    keys, rows = _distinct_rows(spec, table, report, key_model(spec, engine))
    runner = BatchRunner(spec, _engine_factory(spec, engine), _cache(spec, cache), report, progress,
                         null_prompt=null_prompt(spec) if calibrates(spec) else None)
    pending = _ordered_prompts(spec, rows, report)
    texts = runner.answer(pending)
    t0 = time.perf_counter()
    parsed = {key: _parse(fn, spec, text, report) for key, text in texts.items()}
    values = pa.array(
        [parsed.get(k) if k else None for k in keys], type=fn.arrow_type(spec.options)
    )
    report.add_time("parse", time.perf_counter() - t0)
    return CallOutput(values, report)


def resolve_cache(spec: CallSpec, cache: Any = _DEFAULT) -> ResultCache | None:
    """The cache a call uses: the one given, else the process default unless disabled."""
    return _cache(spec, cache)


def engine_factory(spec: CallSpec, engine: Engine | None) -> Callable[[], Engine]:
    """A zero-argument callable returning `engine`, or the shared engine for the call's model."""
    return _engine_factory(spec, engine)


def key_model(spec: CallSpec, engine: Engine | None = None) -> str:
    """The model identity in result-cache keys: the given engine's `model_name`, else the
    call's `model` option, else the settings' model; with its content fingerprint
    (`llmql.udfs.fingerprint`), so replaced weights miss.

    NOTE: an engine passed explicitly (e.g. `connect(engine=load(path))`) must key its own
    results, or answers of one model would be served for another. A remote endpoint is
    keyed by its URL and served model id (asked of the server once).
    """
    name = getattr(engine, "model_name", None)
    if not (isinstance(name, str) and name):
        model = spec.options.model or get_settings().model
        name = get_engine(model).model_name if is_remote(model) else model
    return f"{name}|{model_fingerprint(name)}"


def _as_table(inputs: Any, fields: Sequence[str]) -> pa.Table:
    table = inputs if isinstance(inputs, pa.Table) else pa.table(inputs)
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise UDFError(f"input column(s) {missing} not found; available: {table.column_names}")
    return table.select(list(fields))


def _distinct_rows(
    spec: CallSpec, table: pa.Table, report: CallReport, model: str
) -> tuple[list[str | None], dict[str, dict]]:
    """Per input row its cache key (None for NULL inputs); distinct rows by key, first seen."""
    t0 = time.perf_counter()
    signature = output_signature(spec)
    keys: list[str | None] = []
    rows: dict[str, dict] = {}
    for row in table.to_pylist():
        if any(v is None for v in row.values()):
            report.null_inputs += 1
            keys.append(None)
            continue
        key = cache_key(model, signature, row)
        rows.setdefault(key, row)
        keys.append(key)
    report.distinct_inputs = len(rows)
    report.add_time("dedup", time.perf_counter() - t0)
    return keys, rows


def _ordered_prompts(
    spec: CallSpec, rows: dict[str, dict], report: CallReport
) -> list[PendingPrompt]:
    t0 = time.perf_counter()
    keys = list(rows)
    ordering = _reorder([rows[k] for k in keys], spec.fields, spec.options.reorder_fields)
    pending = [
        PendingPrompt(keys[i], render_prompt(spec, rows[keys[i]], order))
        for i, order in zip(ordering[0], ordering[1])
    ]
    report.add_time("reorder", time.perf_counter() - t0)
    return pending


def _reorder(rows: list[dict], fields: Sequence[str], reorder_fields: bool = False) -> tuple[list[int], list[list[str]]]:
    """Row send order and per-row field order from `llmql.ordering.reorder` (with
    `reorder_fields=False`: fields as written, rows sorted by their values)."""
    if len(rows) < 2:
        return list(range(len(rows))), [list(fields)] * len(rows)
    ordering = reorder(pa.Table.from_pylist(rows), list(fields), reorder_fields=reorder_fields)
    return list(ordering.row_order), [list(f) for f in ordering.field_orders]


def _parse(fn: FunctionSpec, spec: CallSpec, text: str | None, report: CallReport) -> Any:
    if text is None:
        return None
    try:
        return fn.parse(text, spec.options)
    except OutputParseError:
        if spec.options.on_error == "raise":
            raise
        report.parse_failures += 1
        return None


def _engine_factory(spec: CallSpec, engine: Engine | None) -> Callable[[], Engine]:
    if engine is not None:
        return lambda: engine
    return lambda: get_engine(spec.options.model)


def _cache(spec: CallSpec, cache: Any) -> ResultCache | None:
    if spec.options.result_cache is False or not spec.cacheable:
        return None
    if cache is _DEFAULT:
        return default_cache(spec.options.result_cache)
    return cache
