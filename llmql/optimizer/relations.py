"""Building blocks of a plan: input relations of LLM calls and lookups of their results."""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer.deduplicate_inputs import deduplicate_inputs

RESULT = "__llmql_result"  # result column name inside the final query's lookups
KEY = "__llmql_k{}"  # key column names inside the final query's lookups
GROUP_KEY = "__llmql_g{}"  # group-key columns of an llm_agg input relation
_LIST_AGG = {
    "duckdb": "LIST_SORT(LIST(__llmql_x) FILTER(WHERE NOT __llmql_x IS NULL))",
    "spark": "ARRAY_SORT(COLLECT_LIST(__llmql_x))",
}


def visible_ctes(select: exp.Select) -> list[exp.CTE]:
    """CTEs that `select` may reference, outermost first (a CTE sees only earlier ones)."""
    own = select.args.get("with_")
    found: list[list[exp.CTE]] = [list(own.expressions)] if own else []
    node, parent = select, select.parent
    while parent is not None:
        with_ = parent.args.get("with_") if isinstance(parent, exp.Query) else None
        if isinstance(node, exp.CTE) and isinstance(parent, exp.With):
            found.append([c for c in parent.expressions[: node.index]])
        elif with_ is not None and node is not with_:
            found.append(list(with_.expressions))
        node, parent = parent, parent.parent
    return [cte for level in reversed(found) for cte in level]


def input_relation(
    select: exp.Select,
    projections: list[exp.Expression],
    joins: list[exp.Join],
    conditions: list[exp.Expression],
    group: list[exp.Expression] | None = None,
) -> exp.Select:
    """`SELECT [DISTINCT] projections FROM <select's FROM> joins WHERE conditions`.

    Rows come from the FROM/JOINs of `select` (and `joins`, lookups of earlier calls)
    filtered by `conditions`; with `group`, one row per group, else distinct rows.
    """
    query = exp.Select(expressions=[p.copy() for p in projections])
    query.set("from_", select.args["from_"].copy())
    query.set("joins", [j.copy() for j in (select.args.get("joins") or [])] + [j.copy() for j in joins])
    if conditions:
        query.set("where", exp.Where(this=exp.and_(*[c.copy() for c in conditions])))
    if group:
        query.set("group", exp.Group(expressions=[g.copy() for g in group]))
    else:
        query = deduplicate_inputs(query)
    return with_visible_ctes(query, select)


def with_visible_ctes(query: exp.Select, select: exp.Select) -> exp.Select:
    """`query` (standalone SQL) given the CTEs `select` may reference, so its names resolve."""
    ctes = visible_ctes(select)
    if ctes:
        recursive = any(c.parent.args.get("recursive") for c in ctes)
        query.set("with_", exp.With(expressions=[c.copy() for c in ctes], recursive=recursive))
    return query


def lookup_join(table: str, alias: str, keys: list[str], on: list[exp.Expression]) -> exp.Join:
    """`LEFT JOIN (SELECT keys AS __llmql_kN, result AS __llmql_result FROM table) alias ON ...`.

    `on[i]` is matched to `keys[i]` with IS NOT DISTINCT FROM, so NULL inputs find their
    result too; renaming the keys keeps them from clashing with the query's own columns.
    """
    inner = exp.select(
        *[exp.alias_(exp.column(k), KEY.format(i)) for i, k in enumerate(keys)],
        exp.alias_(exp.column("result"), RESULT),
    ).from_(exp.to_table(table))
    cond: exp.Expression = exp.and_(
        *[exp.NullSafeEQ(this=e.copy(), expression=exp.column(KEY.format(i), alias)) for i, e in enumerate(on)]
    ) if on else exp.true()
    return exp.Join(this=exp.alias_(exp.Subquery(this=inner), alias), kind="LEFT", on=cond)


def list_aggregate(arg: exp.Expression, dialect: str) -> exp.Expression:
    """The sorted list of an argument's non-NULL values over a group, in `dialect`."""
    template = exp.maybe_parse(_LIST_AGG.get(dialect, _LIST_AGG["duckdb"]), dialect=dialect)
    return template.transform(
        lambda n: arg.copy() if isinstance(n, exp.Column) and n.name == "__llmql_x" else n
    )
