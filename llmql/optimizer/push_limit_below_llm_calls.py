"""Rule: apply a query's LIMIT to its source before LLM calls see the rows.

`SELECT llm(...) FROM t LIMIT 5` must not answer every row of `t`. When a SELECT's LLM
calls are all row-level projections (none in WHERE, ORDER BY or an aggregate), and it has a
literal LIMIT, the rows of its single source that pass the WHERE, in ORDER BY order, LIMIT
and OFFSET applied, become a plan `Source`: the connector materialises them once, and the
SELECT reads that table under the source's own name, so every column reference still
resolves. The outer query keeps ORDER BY and LIMIT (the same rows come out, in order);
WHERE and OFFSET are dropped there, as they have been applied. Materialising matters: a
LIMIT without ORDER BY (or with ties) may pick other rows each time it runs, and the LLM
calls' inputs and the final query must see the same ones.

Left alone (all rows are still answered; the result is the same): LLM filters (how many
rows pass is not known before the calls), joins, DISTINCT, GROUP BY, HAVING, QUALIFY, window
functions, and ORDER BY keys that are not source columns (directly, by ordinal or by the
alias of a plain column).
"""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer import analysis as an
from llmql.optimizer.relations import with_visible_ctes
from llmql.optimizer.types import Source

SOURCE = "__llmql_src_{}"


def push_limit_below_llm_calls(
    expression: exp.Expression,
    *,
    dialect: str = "duckdb",
    sources: list[Source] | None = None,
    **_: object,
) -> exp.Expression:
    """Read each limited SELECT with row-level LLM calls from a materialised, limited source.

    >>> import sqlglot
    >>> sql = "SELECT llm('Say', a) FROM t AS x WHERE b > 1 ORDER BY x.id LIMIT 2 OFFSET 1"
    >>> out = []
    >>> push_limit_below_llm_calls(sqlglot.parse_one(sql), sources=out).sql()
    "SELECT LLM('Say', a) FROM __llmql_src_0 AS x ORDER BY x.id LIMIT 2"
    >>> out[0].sql
    'SELECT * FROM t AS x WHERE b > 1 ORDER BY x.id NULLS FIRST LIMIT 2 OFFSET 1'
    """
    sources = [] if sources is None else sources
    for select in an.selects_post_order(expression):
        order = _pushable_order(select)
        if order is not None:
            _push(select, order, dialect, sources)
    return expression


def _pushable_order(select: exp.Select) -> exp.Order | None:
    """The source ORDER BY (see `_source_order`) when the LIMIT can be pushed, else None."""
    limit = select.args.get("limit")
    if not isinstance(limit, exp.Limit) or not _is_count(limit.expression):
        return None
    offset = select.args.get("offset")
    if offset is not None and not _is_count(offset.expression):
        return None
    calls = an.scope_calls(select)
    if not calls or any(an.clause_of(c, select) != "expressions" for c in calls):
        return None
    if an.is_aggregate_select(select) or any(an.inside_aggregate(c, select) for c in calls):
        return None
    if any(select.args.get(k) for k in ("joins", "distinct", "group", "having", "qualify", "laterals")):
        return None
    if any(isinstance(n, exp.Window) for item in select.expressions for n in item.walk()):
        return None
    source = select.args.get("from_")
    if source is None or not isinstance(source.this, (exp.Table, exp.Subquery)) or not source.this.alias_or_name:
        return None
    if an.has_llm_call(source):
        return None
    return _source_order(select)


def _source_order(select: exp.Select) -> exp.Order | None:
    """The ORDER BY in source columns (ordinals and aliases of plain columns resolved);
    an empty Order without ORDER BY; None when a key is not a source column."""
    order = select.args.get("order")
    if order is None:
        return exp.Order(expressions=[])
    items = select.expressions
    aliases = {item.alias: item.this for item in items if isinstance(item, exp.Alias)}
    keys = []
    for key in order.expressions:
        ordered = key.copy() if isinstance(key, exp.Ordered) else exp.Ordered(this=key.copy())
        column = ordered.this
        if isinstance(column, exp.Literal) and not column.is_string and column.name.isdigit():
            index = int(column.name) - 1
            column = items[index].unalias() if 0 <= index < len(items) else None
        elif isinstance(column, exp.Column) and not column.table and column.name in aliases:
            column = aliases[column.name]
        if not isinstance(column, exp.Column) or isinstance(column.this, exp.Star):
            return None
        ordered.set("this", column.copy())
        keys.append(ordered)
    return exp.Order(expressions=keys)


def _push(select: exp.Select, order: exp.Order, dialect: str, sources: list[Source]) -> None:
    source = select.args["from_"].this
    name = source.alias_or_name
    inner = exp.select("*").from_(source.copy())
    for key in ("where", "limit", "offset"):
        if select.args.get(key) is not None:
            inner.set(key, select.args[key].copy())
    if order.expressions:
        inner.set("order", order)
    inner = with_visible_ctes(inner, select)
    table = SOURCE.format(len(sources))
    sources.append(Source(name=table, sql=inner.sql(dialect=dialect)))
    select.set("from_", exp.From(this=exp.alias_(exp.to_table(table), name, table=True)))
    select.set("where", None)
    select.set("offset", None)


def _is_count(node: exp.Expression | None) -> bool:
    return isinstance(node, exp.Literal) and not node.is_string and node.name.isdigit()
