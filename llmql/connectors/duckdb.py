"""DuckDB connector: `connect()` runs LLM queries through the optimiser's plan; `register()` adds
the LLM functions to any DuckDB connection as vectorised Python UDFs.

    con = llmql.connect()
    con.sql("SELECT * FROM movies WHERE llm_filter('Suitable for kids?', movie_info)").df()
    print(con.last_report())
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from llmql.engine.types import Engine
from llmql.udfs.aggregate import run_spec
from llmql.udfs.batch import predicted_tokens
from llmql.udfs.engines import loaded_engine
from llmql.udfs.report import QueryReport
from llmql.udfs.types import FUNCTIONS, CallOptions, CallReport, CallSpec, new_tenant
from llmql.udfs.vectorized import SQL_TYPES, ReportCollector, make_udf

__all__ = ["LLMConnection", "Registration", "connect", "register"]
_AGG_IMPL = "__llmql_llm_agg"
_LLM_CALL = re.compile(r"\bllm(_filter|_classify|_score|_extract|_agg)?\s*\(", re.IGNORECASE)


@dataclass
class Registration:
    """What `register()` installed; `last_report()` sums the UDF calls since the last one."""

    con: duckdb.DuckDBPyConnection
    collector: ReportCollector

    def last_report(self) -> CallReport:
        """The UDF calls' combined report since the previous `last_report()`."""
        return self.collector.take()


def register(
    con: duckdb.DuckDBPyConnection, *, engine: Engine | None = None, **options: Any
) -> Registration:
    """Add llm, llm_filter, llm_classify, llm_score, llm_extract, llm_agg to `con`.

    The functions run per DuckDB batch (dedup + reorder inside each batch). Prompt field
    names: pass one STRUCT (`{'title': title, 'review': review}`) to name them, else they
    are `input`, `input1`, `input2`, ... `llm_extract` returns JSON text here.

    Args:
        con: the DuckDB connection.
        engine: engine to use (default: the shared engine of `options['model']`).
        **options: CallOptions applied to every call (model, max_tokens, temperature, ...).
    """
    CallOptions.from_dict(options)
    collector = ReportCollector()
    for function in FUNCTIONS:
        udf = make_udf(function, options, engine=engine, collector=collector)
        name = _AGG_IMPL if function == "llm_agg" else function
        _replace_function(con, name, udf, SQL_TYPES[function])
    con.execute(f"CREATE OR REPLACE TEMP MACRO llm_agg(i, c) AS {_AGG_IMPL}(i, list(c))")
    return Registration(con, collector)


def connect(
    database: str | None = None,
    *,
    engine: Engine | None = None,
    read_only: bool = False,
    config: dict | None = None,
    **options: Any,
) -> LLMConnection:
    """A DuckDB connection whose `sql()`/`execute()` plan and batch the LLM calls of a query.

    Args:
        database: DuckDB database file (None = in memory).
        engine: engine to use (default: the shared engine, loaded on the first model call).
        read_only, config: passed to `duckdb.connect`.
        **options: default CallOptions for every call (max_tokens, temperature, ...).
    """
    con = duckdb.connect(database or ":memory:", read_only=read_only, config=config or {})
    return LLMConnection(con, engine=engine, options=options)


class LLMConnection:
    """A DuckDB connection that runs LLM queries as optimised plans; everything else passes
    through to the wrapped `duckdb.DuckDBPyConnection` (`.con`)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        engine: Engine | None = None,
        options: dict | None = None,
    ) -> None:
        self.con = con
        self.engine = engine
        self.options = dict(options or {})
        self.registration = register(con, engine=engine, **self.options)
        self._report = QueryReport()
        self._tenant = new_tenant()

    def sql(self, query: str, **kwargs: Any) -> duckdb.DuckDBPyRelation:
        """Run `query` (LLM calls planned, batched and cached) and return a DuckDB relation."""
        final_sql = self._prepare(query)
        return self._timed("final_sql", lambda: self.con.sql(final_sql, **kwargs))

    def execute(self, query: str, parameters: Any = None) -> LLMConnection:
        """Like `DuckDBPyConnection.execute`; fetch with `.fetchall()`, `.df()`, `.arrow()`.

        With LLM calls in the query, `parameters` are written into it as literals first (the
        plan's input relations need their values too)."""
        if parameters is not None and _LLM_CALL.search(query):
            from llmql.optimizer.planner import bind_parameters

            query, parameters = bind_parameters(query, parameters), None
        final_sql = self._prepare(query)
        self._timed("final_sql", lambda: self.con.execute(final_sql, parameters))
        return self

    def explain(self, query: str) -> str:
        """The optimiser's EXPLAIN of `query` (calls, input relations, prefix reuse), and the
        engine's predicted output tokens per call once its length predictor has data."""
        try:
            from llmql.optimizer import explain
        except ImportError:
            return _describe_plan(_plan(query, self.con))
        return str(explain(query, con=self.con)) + self._predictions(_plan(query, self.con))

    def _predictions(self, plan: Any) -> str:
        lines = []
        for call in plan.calls if plan is not None else []:
            options = CallOptions.from_dict(call.call_options(self.options))
            engine = self.engine or loaded_engine(options.model)
            spec = CallSpec(call.function, call.instruction, tuple(call.fields), options)
            tokens = predicted_tokens(spec, engine) if engine is not None else None
            if tokens is not None:
                lines.append(f"{call.id}: predicted output tokens per row ~ {tokens:.1f}")
        return "".join(f"\n{line}" for line in lines)

    def last_report(self) -> QueryReport:
        """The report of the previous `sql()`/`execute()` (UDF calls run at fetch time are
        included as one `udf` entry)."""
        udf = self.registration.collector.take()
        if udf.rows:
            self._report.add_call("udf", "(per batch)", udf, sum(udf.seconds.values()))
        return self._report

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)

    def __enter__(self) -> LLMConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, query: str) -> str:
        """Plan `query`, run its LLM calls, register their result tables; the SQL to run."""
        self._report = QueryReport()
        self._tenant = new_tenant()
        self.registration.collector.take()
        plan = self._timed("plan", lambda: _plan(query, self.con))
        if plan is None or not plan.calls:
            return query
        for source in plan.sources:
            self._timed("input_sql", lambda s=source: self.con.register(s.name, _arrow(self.con.sql(s.sql))))
        for call in plan.calls:
            self._run_call(call)
        return plan.final_sql

    def _run_call(self, call: Any) -> None:
        inputs = self._timed("input_sql", lambda: _arrow(self.con.sql(call.input_sql)))
        options = CallOptions.from_dict({"tenant": self._tenant, **call.call_options(self.options)})
        spec = CallSpec(call.function, call.instruction, tuple(call.fields), options)
        t0 = time.perf_counter()
        out = run_spec(spec, inputs, engine=self.engine)
        self._report.add_call(call.id, call.function, out.report, time.perf_counter() - t0)
        table = inputs.append_column("result", out.values)
        self.con.register(call.result_table, table)

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        return self._report.timed(stage, fn)


def _arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """A relation's rows as one Arrow table (newer DuckDB returns a reader)."""
    out = relation.arrow()
    return out.read_all() if isinstance(out, pa.RecordBatchReader) else out


def _plan(query: str, con: duckdb.DuckDBPyConnection) -> Any:
    """The optimiser's plan; None for SQL without LLM calls, or when the optimiser is not
    installed or cannot rewrite the query (the registered UDFs then run it per batch)."""
    if not _LLM_CALL.search(query):
        return None
    try:
        from llmql.optimizer import UnsupportedError, plan
    except ImportError:
        return None
    try:
        return plan(query, dialect="duckdb", schema=_schema(con))
    except UnsupportedError:
        return None


def _describe_plan(plan: Any) -> str:
    """A plain listing of a plan (used when the optimiser offers no EXPLAIN)."""
    if plan is None:
        return "no LLM calls planned (the query runs as is)"
    lines = []
    for call in plan.calls:
        lines.append(f"{call.id}: {call.function}({call.instruction!r}, {', '.join(call.fields)})")
        lines.append(f"  input: {call.input_sql}")
    lines.append(f"final: {plan.final_sql}")
    return "\n".join(lines)


def _schema(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
    ).fetchall()
    schema: dict[str, dict[str, str]] = {}
    for table, column, dtype in rows:
        schema.setdefault(table, {})[column] = dtype
    return schema


def _replace_function(con: duckdb.DuckDBPyConnection, name: str, fn: Callable, rtype: str) -> None:
    with contextlib.suppress(duckdb.InvalidInputException, duckdb.CatalogException):
        con.remove_function(name)
    con.create_function(
        name, fn, None, rtype, type="arrow", null_handling="special", side_effects=False
    )
