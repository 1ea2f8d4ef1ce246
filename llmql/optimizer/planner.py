"""`plan()`: SQL text in, an `LLMPlan` out."""

from __future__ import annotations

from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import OptimizeError, ParseError, TokenError
from sqlglot.optimizer.qualify import qualify

from llmql.optimizer.errors import PlanError, SQLParseError, UnknownColumnError, UnsupportedError
from llmql.optimizer.optimizer import optimize
from llmql.optimizer.types import LLMCall, LLMPlan, Source

DIALECTS = ("duckdb", "spark")
Schema = dict[str, dict[str, str]]


def plan(sql: str, dialect: str = "duckdb", *, schema: Schema | None = None) -> LLMPlan:
    """Plan a query's LLM calls: input relations, execution order, and the rewritten query.

    Args:
        sql: one SELECT query calling llm, llm_filter, llm_classify, llm_score,
            llm_extract or llm_agg anywhere a row-level expression (or, for llm_agg, an
            aggregate) may appear.
        dialect: "duckdb" or "spark".
        schema: optional `{table: {column: type}}`; unknown columns then raise before any
            model call.

    Returns:
        An `LLMPlan` whose calls run in order (see `LLMCall`), then `final_sql`.

    Raises:
        SQLParseError: the SQL does not parse (message with line and column).
        UnknownColumnError: a column missing from `schema`.
        UnsupportedError: an LLM call in a construct that cannot be planned.
        PlanError: any other invalid call (e.g. a non-literal instruction).
    """
    expression = parse(sql, dialect)
    if schema:
        check_columns(expression, schema, dialect)
    calls: list[LLMCall] = []
    sources: list[Source] = []
    final = optimize(expression, dialect=dialect, calls=calls, sources=sources)
    return LLMPlan(sql=sql, dialect=dialect, calls=tuple(calls), final_sql=final.sql(dialect=dialect),
                   sources=tuple(sources))


def parse(sql: str, dialect: str = "duckdb") -> exp.Query:
    """Parse exactly one query, turning sqlglot errors into `SQLParseError` with line/col."""
    if dialect not in DIALECTS:
        raise PlanError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        line, col = first.get("line"), first.get("col")
        raise SQLParseError(f"SQL does not parse at line {line}, col {col}: {first.get('description', err)}", line, col) from err
    except TokenError as err:
        raise SQLParseError(f"SQL does not parse: {err}") from err
    if len(statements) != 1:
        raise PlanError(f"expected one SQL statement, got {len(statements)}")
    if not isinstance(statements[0], exp.Query):
        raise UnsupportedError(f"only queries (SELECT) can be planned, got {statements[0].key.upper()}")
    return statements[0]


def bind_parameters(sql: str, parameters: Any, dialect: str = "duckdb") -> str:
    """`sql` with its prepared-statement parameters written in as SQL literals.

    `?` takes the next value of a list/tuple; `$1` the first; `$name` the value of a dict key.
    The plan's input relations then carry the values too (they run without parameters).

    >>> bind_parameters("SELECT llm('Why?', a) FROM t WHERE x > ? AND y = ?", [2, "it's"])
    "SELECT llm('Why?', a) FROM t WHERE x > 2 AND y = 'it''s'"
    >>> bind_parameters("SELECT * FROM t WHERE x > $lo", {"lo": 1.5})
    'SELECT * FROM t WHERE x > 1.5'
    """
    if parameters is None:
        return sql
    try:
        tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(sql)
    except TokenError as err:
        raise SQLParseError(f"SQL does not parse: {err}") from err
    edits: list[tuple[int, int, Any]] = []  # (start, end, value)
    positional = iter(parameters if isinstance(parameters, (list, tuple)) else ())
    numbered = False
    for i, token in enumerate(tokens):
        if token.token_type.name == "PLACEHOLDER" and token.text == "?":
            try:
                edits.append((token.start, token.end, next(positional)))
            except StopIteration:
                raise PlanError("fewer parameters than ? placeholders in the query") from None
        elif token.token_type.name == "PARAMETER" and i + 1 < len(tokens):
            numbered = True
            edits.append((token.start, tokens[i + 1].end, _parameter(parameters, tokens[i + 1].text)))
    if isinstance(parameters, (list, tuple)) and not numbered and len(edits) < len(parameters):
        raise PlanError(f"{len(parameters)} parameters for {len(edits)} ? placeholders in the query")
    for start, end, value in reversed(edits):
        sql = sql[:start] + exp.convert(value).sql(dialect=dialect) + sql[end + 1 :]
    return sql


def _parameter(parameters: Any, name: str) -> Any:
    try:
        if isinstance(parameters, dict):
            return parameters[name]
        return parameters[int(name) - 1]
    except (KeyError, IndexError, ValueError):
        raise PlanError(f"no value given for parameter ${name}") from None


def check_columns(expression: exp.Expression, schema: Schema, dialect: str) -> None:
    """Raise `UnknownColumnError` if a column of the query is not in `schema`."""
    try:
        qualify(expression.copy(), schema=schema, dialect=dialect, validate_qualify_columns=True)
    except OptimizeError as err:
        raise UnknownColumnError(str(err)) from err


def schema_from_duckdb(con: Any) -> Schema:
    """`{table: {column: type}}` for every table and view of a DuckDB connection."""
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
    ).fetchall()
    schema: Schema = {}
    for table, column, dtype in rows:
        schema.setdefault(table, {})[column] = dtype
    return schema
