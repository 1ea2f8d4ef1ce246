"""LLM functions over Arrow tables: table in, table out (the pandas accessor adapts these).

    movies = llm_map(movies, "Summarise the review.", "movie_title", "review_content")
    kids = llm_filter(movies, "Is {movie_info} suitable for kids?")

Columns are given after the instruction, or as `{column}` placeholders inside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llmql.engine.types import Engine
from llmql.udfs.aggregate import run_agg
from llmql.udfs.executor import run_call
from llmql.udfs.types import CallOptions, CallReport, CallSpec, UDFError, new_tenant

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_LAST: list[CallReport] = [CallReport()]


def last_report() -> CallReport:
    """The report of the most recent Arrow/pandas LLM call in this process."""
    return _LAST[0]


def resolve_columns(
    table_columns: Sequence[str], instruction: str, columns: Sequence[str]
) -> tuple[str, tuple[str, ...]]:
    """The instruction (placeholders unwrapped) and prompt fields, checked against the table.

    Raises:
        UDFError: no columns, or columns the table does not have.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise UDFError("the instruction must be a non-empty string")
    fields = tuple(columns) or tuple(dict.fromkeys(_PLACEHOLDER.findall(instruction)))
    if not fields:
        raise UDFError("name the input columns, as arguments or as {column} placeholders")
    missing = [c for c in fields if c not in table_columns]
    if missing:
        raise UDFError(f"column(s) {missing} not found; available: {list(table_columns)}")
    return _PLACEHOLDER.sub(lambda m: m.group(1), instruction), fields


def call(
    table: pa.Table,
    function: str,
    instruction: str,
    columns: Sequence[str] = (),
    *,
    engine: Engine | None = None,
    **options: Any,
) -> pa.Array:
    """Run one row function over `table`; the values, aligned with its rows."""
    instruction, fields = resolve_columns(table.column_names, instruction, columns)
    options = {"tenant": new_tenant("call"), **options}  # NOTE: one tenant per call unless set
    spec = CallSpec(function, instruction, fields, CallOptions.from_dict(options))
    out = run_call(spec, table, engine=engine)
    _LAST[0] = out.report
    return out.values


def llm_map(
    table: pa.Table,
    instruction: str,
    *columns: str,
    out: str = "llm",
    engine: Engine | None = None,
    **options: Any,
) -> pa.Table:
    """`table` with a string column `out` holding the answer per row."""
    return _append(table, out, call(table, "llm", instruction, columns, engine=engine, **options))


def llm_filter(
    table: pa.Table, instruction: str, *columns: str, engine: Engine | None = None, **options: Any
) -> pa.Table:
    """The rows of `table` for which the model answers yes (NULL answers drop the row)."""
    mask = call(table, "llm_filter", instruction, columns, engine=engine, **options)
    return table.filter(pc.fill_null(mask, False))


def llm_classify(
    table: pa.Table,
    instruction: str,
    labels: Sequence[str],
    *columns: str,
    out: str = "label",
    engine: Engine | None = None,
    **options: Any,
) -> pa.Table:
    """`table` with a column `out` holding one of `labels` per row."""
    values = call(
        table, "llm_classify", instruction, columns, engine=engine, labels=tuple(labels), **options
    )
    return _append(table, out, values)


def llm_score(
    table: pa.Table,
    instruction: str,
    lo: int,
    hi: int,
    *columns: str,
    out: str = "score",
    engine: Engine | None = None,
    **options: Any,
) -> pa.Table:
    """`table` with an integer column `out` in [lo, hi] per row."""
    values = call(table, "llm_score", instruction, columns, engine=engine, lo=lo, hi=hi, **options)
    return _append(table, out, values)


def llm_extract(
    table: pa.Table,
    instruction: str,
    json_schema: dict | str,
    *columns: str,
    engine: Engine | None = None,
    **options: Any,
) -> pa.Table:
    """`table` with one column per schema property, extracted per row."""
    values = call(
        table,
        "llm_extract",
        instruction,
        columns,
        engine=engine,
        json_schema=json_schema,
        **options,
    )
    for name, child in zip([f.name for f in values.type], values.flatten()):
        table = _append(table, name, child)
    return table


def llm_agg(
    table: pa.Table,
    instruction: str,
    column: str,
    *,
    by: Sequence[str] = (),
    out: str = "summary",
    engine: Engine | None = None,
    **options: Any,
) -> pa.Table:
    """One row per group of `by` (one row overall without `by`) with a summary `out`."""
    instruction, fields = resolve_columns(table.column_names, instruction, (column,))
    missing = [c for c in by if c not in table.column_names]
    if missing:
        raise UDFError(f"group column(s) {missing} not found; available: {table.column_names}")
    grouped = table.group_by(list(by), use_threads=False).aggregate([(column, "list")])
    spec = CallSpec("llm_agg", instruction, fields, CallOptions.from_dict(options))
    result = run_agg(spec, grouped.column(f"{column}_list").to_pylist(), engine=engine)
    _LAST[0] = result.report
    return grouped.select(list(by)).append_column(out, result.values)


def _append(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        table = table.drop_columns([name])
    return table.append_column(name, values)
