"""Rule: evaluate WHERE conjuncts without LLM calls first, then LLM filters cheapest first."""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer import analysis as an


def order_llm_filters(expression: exp.Expression, **_: object) -> exp.Expression:
    """Reorder each WHERE: plain conjuncts, then LLM conjuncts by `filter_cost`.

    `rewrite_llm_lookups` plans LLM conjuncts in this order, each seeing only the rows that
    passed everything before it (plain conjuncts are pushed below every LLM call).

    >>> import sqlglot
    >>> sql = "SELECT a FROM t WHERE llm('Tag', a, b) = 'x' AND llm_filter('Ok?', a) AND b > 2"
    >>> order_llm_filters(sqlglot.parse_one(sql)).sql()
    "SELECT a FROM t WHERE b > 2 AND LLM_FILTER('Ok?', a) AND LLM('Tag', a, b) = 'x'"
    """
    for select in an.selects_post_order(expression):
        where = select.args.get("where")
        if where is None or not an.scope_calls(where, select):
            continue
        parts = an.conjuncts(where)
        plain = [c for c in parts if not an.scope_calls(c, select)]
        llm = sorted((c for c in parts if an.scope_calls(c, select)), key=lambda c: filter_cost(c, select))
        where.set("this", exp.and_(*plain, *llm, copy=False))
    return expression


def filter_cost(condition: exp.Expression, select: exp.Select) -> tuple:
    """Sort key of an LLM conjunct: fewer calls, cheaper functions, fewer fields, shorter text."""
    specs = [an.parse_call(c) for c in an.scope_calls(condition, select)]
    return (
        len(specs),
        max(an.FUNCTION_COST.get(s.function, 5) for s in specs),
        max(len(s.args) for s in specs),
        sum(len(s.instruction) for s in specs),
    )
