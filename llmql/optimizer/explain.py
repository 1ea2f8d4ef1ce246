"""`explain()`: a readable account of a query's LLM plan, with statistics from DuckDB."""

from __future__ import annotations

from collections import Counter
from typing import Any

import sqlglot
from sqlglot import exp

from llmql.optimizer.planner import plan, schema_from_duckdb
from llmql.optimizer.types import LLMCall, Source
from llmql.ordering import measure, reorder

CHARS_PER_TOKEN = 4  # NOTE: prompt-token estimates without a tokenizer
HINT_GAIN = 0.10  # NOTE: EXPLAIN suggests field reordering when it would reuse this much more


def explain(sql: str, *, con: Any = None, dialect: str = "duckdb") -> str:
    """Describe each LLM call: input relation, rows vs distinct inputs, prompt tokens, reuse.

    With a DuckDB connection holding the tables, calls that depend on no other call are
    measured: input rows, distinct inputs, estimated prompt tokens, and the prefix hit rate
    of their prompts in table order and in the order the call sends them (with fields as
    written, a hint when reordering them would reuse 10 points more). No model is called.

    >>> print(explain("SELECT llm('Name', a) FROM t WHERE llm_filter('Ok?', b)"))
    LLM filters, in order: llm_0 (llm_filter)
    llm_0: llm_filter('Ok?') fields=[b] filter
      input: SELECT DISTINCT b AS b FROM t
    llm_1: llm('Name') fields=[a] after llm_0
      input: SELECT DISTINCT a AS a FROM t LEFT JOIN ...
    final: SELECT ...
    """
    schema = schema_from_duckdb(con) if con is not None else None
    p = plan(sql, dialect, schema=schema)
    filters = [f"{c.id} ({c.function})" for c in p.calls if c.is_filter]
    lines = [f"LLM filters, in order: {', '.join(filters) or 'none'}"]
    lines += [f"{s.name}: {_short(s.sql)} (materialised first)" for s in p.sources]
    for call in p.calls:
        lines.extend(_describe(call, con, p.sources, dialect))
    lines.append(f"final: {_short(p.final_sql)}")
    return "\n".join(lines)


def _describe(call: LLMCall, con: Any, sources: tuple[Source, ...], dialect: str) -> list[str]:
    flags = (" filter" if call.is_filter else "") + (f" after {', '.join(call.depends_on)}" if call.depends_on else "")
    if call.options.get("adapter"):
        flags += f" adapter={call.options['adapter']}"
    lines = [f"{call.id}: {call.function}({call.instruction!r}) fields=[{', '.join(call.fields)}]{flags}",
             f"  input: {_short(call.input_sql)}"]
    if con is None:
        return lines
    if call.depends_on:
        return [*lines, f"  rows: known once {', '.join(call.depends_on)} ran"]
    input_sql = _with_sources(call.input_sql, sources, dialect)
    table = con.sql(input_sql).to_arrow_table()
    rows = con.execute(f"SELECT COUNT(*) FROM ({_all_rows(input_sql)})").fetchall()[0][0]
    fields = list(call.fields)
    spec = call.spec()
    spec.validate()
    prefix = spec.shared_prefix()  # NOTE: the instruction and any few-shot examples
    before = measure(table, instruction=prefix, fields=fields)
    reorder_fields = spec.options.reorder_fields
    after = measure(table, reorder(table, fields, reorder_fields=reorder_fields), instruction=prefix, fields=fields)
    how = "reordered (rows and fields)" if reorder_fields else "rows sorted (fields as written)"
    lines.append(f"  rows: {rows} -> {table.num_rows} distinct inputs; ~{before.total // CHARS_PER_TOKEN} prompt tokens")
    lines.append(f"  prefix hit rate: {before.hit_rate:.1%} in table order -> {after.hit_rate:.1%} {how} "
                 f"(unbounded cache: {before.trie_hit_rate:.1%} -> {after.trie_hit_rate:.1%})")
    if not reorder_fields and len(fields) > 1:
        ordering = reorder(table, fields)
        best = measure(table, ordering, instruction=prefix, fields=fields)
        if best.trie_hit_rate - after.trie_hit_rate >= HINT_GAIN:
            first = Counter(order[0] for order in ordering.field_orders).most_common(1)[0][0]
            lines.append(f"  hint: {best.trie_hit_rate:.1%} with reorder_fields := true, or write {first} first "
                         "(the field order can change answers)")
    return lines


def _with_sources(sql: str, sources: tuple[Source, ...], dialect: str) -> str:
    """`sql` reading the plan's sources as CTEs, so nothing is materialised on `con`."""
    if not sources:
        return sql
    query = sqlglot.parse_one(sql, read=dialect)
    own = query.args.get("with_")
    ctes = [exp.CTE(this=sqlglot.parse_one(s.sql, read=dialect), alias=exp.TableAlias(this=exp.to_identifier(s.name)))
            for s in sources]
    query.set("with_", exp.With(expressions=ctes + (list(own.expressions) if own else [])))
    return query.sql(dialect=dialect)


def _all_rows(input_sql: str) -> str:
    dedup = sqlglot.parse_one(input_sql, read="duckdb")
    dedup.set("distinct", None)
    return dedup.sql(dialect="duckdb")


def _short(sql: str, limit: int = 60) -> str:
    return sql if len(sql) <= limit else sql[: limit - 4].rstrip() + " ..."
