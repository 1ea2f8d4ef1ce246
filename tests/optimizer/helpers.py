"""Fixture reader, a deterministic stand-in for the model, and a plan executor on DuckDB."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import duckdb
import pyarrow as pa

from llmql.optimizer import LLMPlan

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "optimizer"
MAX_ARGS = 4


def load_fixture(name: str) -> list[dict]:
    """Cases of `tests/fixtures/optimizer/<name>.sql`: `# key: value` lines, then `input;` `expected;`."""
    cases, meta, statements = [], {}, []
    buffer: list[str] = []
    for line in (FIXTURES / f"{name}.sql").read_text().splitlines():
        if line.startswith("# ") and ":" in line and not buffer:
            key, _, value = line[2:].partition(":")
            meta[key.strip()] = value.strip()
            continue
        if not line.strip() and not buffer:
            continue
        buffer.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(buffer).rstrip()[:-1].strip())
            buffer = []
            if len(statements) == 2:
                cases.append({**meta, "input": statements[0], "expected": statements[1]})
                meta, statements = {}, []
    return cases


def stand_in(function: str, instruction: str, params: list, values: list) -> object:
    """The fake model: a pure function of (function, instruction, parameters, values)."""
    text = "|".join("<null>" if v is None else str(v) for v in values)
    h = zlib.crc32(f"{instruction}#{text}".encode())
    if function == "llm":
        return f"{instruction}:{text}".upper()
    if function == "llm_filter":
        return h % 2 == 0
    if function == "llm_classify":
        return params[0][h % len(params[0])]
    if function == "llm_score":
        return int(params[0]) + h % (int(params[1]) - int(params[0]) + 1)
    if function == "llm_extract":
        return json.dumps({"n": len(text)})
    if function == "llm_agg":
        return None if values[0] is None else f"{instruction}:{values[0]}"
    raise ValueError(function)


_TYPES = {"llm_filter": pa.bool_(), "llm_score": pa.int64()}


def connect() -> duckdb.DuckDBPyConnection:
    """DuckDB with small test tables and the stand-in registered under the LLM names."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t AS SELECT * FROM (VALUES (1, 'apple', 'red', 10), (2, 'pear', 'green', 20),"
        " (3, 'apple', 'red', 30), (4, NULL, 'blue', 40), (5, 'kiwi', NULL, NULL), (6, 'pear', 'green', 60),"
        " (7, 'plum', 'red', 70), (8, 'fig', 'blue', 80)) v(id, a, b, x)"
    )
    con.execute(
        "CREATE TABLE u AS SELECT * FROM (VALUES (1, 'one'), (2, 'two'), (3, 'three'), (3, 'drei'),"
        " (4, NULL), (9, 'nine')) v(id, c)"
    )
    con.execute(
        f"CREATE TABLE movies AS SELECT * FROM read_csv_auto('{_data_dir() / 'movies.csv'}') LIMIT 80"
    )
    _register(con)
    return con


def _data_dir() -> Path:
    # NOTE: the first 200 rows of the team's movies.csv, kept in the repo so tests run anywhere.
    return Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _register(con: duckdb.DuckDBPyConnection) -> None:
    def py(function: str):
        def fn(instruction, params, values):
            params = [params] if function == "llm_classify" else params or []
            return stand_in(function, instruction, params, list(values))
        return fn

    for function, rtype in [("llm", "VARCHAR"), ("llm_filter", "BOOLEAN"), ("llm_classify", "VARCHAR"),
                            ("llm_score", "BIGINT"), ("llm_extract", "VARCHAR"), ("llm_agg", "VARCHAR")]:
        con.create_function(f"_py_{function}", py(function), ["VARCHAR", "VARCHAR[]", "VARCHAR[]"],
                            rtype, null_handling="special")
    lead = {"llm": [], "llm_filter": [], "llm_classify": ["labels"], "llm_score": ["lo", "hi"],
            "llm_extract": ["js"]}
    for function, params in lead.items():
        overloads = []
        for n in range(1, MAX_ARGS + 1):
            args = [f"a{i}" for i in range(n)]
            plist = f"[{', '.join(f'{p}::VARCHAR' for p in params)}]::VARCHAR[]" if function != "llm_classify" else "labels"
            vals = ", ".join(f"{a}::VARCHAR" for a in args)
            overloads.append(f"({', '.join(['i', *params, *args])}) AS _py_{function}(i, {plist}, [{vals}])")
        con.execute(f"CREATE MACRO {function} " + ", ".join(overloads))
    con.execute(
        "CREATE MACRO llm_agg(i, x) AS _py_llm_agg(i, []::VARCHAR[],"
        " [list_sort(list(x) FILTER (WHERE x IS NOT NULL))::VARCHAR])"
    )


def execute_plan(con: duckdb.DuckDBPyConnection, plan: LLMPlan) -> list[tuple]:
    """Run a plan the way a connector does, computing each call's results with `stand_in`."""
    for source in plan.sources:
        con.register(source.name, con.sql(source.sql).to_arrow_table())
    for call in plan.calls:
        table = con.sql(call.input_sql).to_arrow_table()
        # NOTE: values are rendered to text by DuckDB, exactly as the stand-in macros do.
        con.register("__llmql_in", table)
        casts = ", ".join(f'CAST("{f}" AS VARCHAR)' for f in call.fields)
        rows = con.execute(f"SELECT {casts} FROM __llmql_in").fetchall()
        con.unregister("__llmql_in")
        params = _params(call)
        results = [stand_in(call.function, call.instruction, params, list(r)) for r in rows]
        column = pa.array(results, type=_TYPES.get(call.function, pa.string()))
        con.register(call.result_table, table.append_column("result", column))
    return con.execute(plan.final_sql).fetchall()


def _params(call) -> list:
    o = call.options
    if call.function == "llm_classify":
        return [o["labels"]]
    if call.function == "llm_score":
        return [o["lo"], o["hi"]]
    return []


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    """Equal as multisets of rows (order-insensitive; NULL-safe)."""
    key = lambda r: tuple((v is None, repr(v)) for v in r)  # noqa: E731
    return sorted(a, key=key) == sorted(b, key=key)
