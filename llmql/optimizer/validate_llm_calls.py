"""Rule: reject LLM calls that cannot be planned, before any model call."""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer import analysis as an
from llmql.optimizer.errors import UnsupportedError

_CLAUSES = {"expressions": "SELECT", "where": "WHERE", "group": "GROUP BY", "having": "HAVING",
            "order": "ORDER BY", "qualify": "QUALIFY"}


def validate_llm_calls(expression: exp.Expression, **_: object) -> exp.Expression:
    """Check every LLM call's arguments and placement; return the tree unchanged.

    Raises `PlanError` for a malformed call, and `UnsupportedError` naming the construct
    for a call inside a window function, a JOIN condition, a correlated subquery, or a
    set operation's ORDER BY.

    >>> import sqlglot
    >>> validate_llm_calls(sqlglot.parse_one("SELECT llm('Sum up', a) FROM t")).sql()
    "SELECT LLM('Sum up', a) FROM t"
    >>> validate_llm_calls(sqlglot.parse_one("SELECT SUM(llm_score('Rate', 1, 5, a)) OVER () FROM t"))
    Traceback (most recent call last):
    ...
    llmql.optimizer.errors.UnsupportedError: an LLM call inside a window function is not supported: LLM_SCORE('Rate', 1, 5, a)
    """
    for call in [n for n in expression.walk() if an.llm_function(n)]:
        an.parse_call(call)
        _check_placement(call)
    for select in an.selects_post_order(expression):
        if an.scope_calls(select):
            _check_uncorrelated(select)
    return expression


def _check_placement(call: exp.Anonymous) -> None:
    scope, text = an.enclosing_scope(call), call.sql()
    if not isinstance(scope, exp.Select):
        raise UnsupportedError(f"an LLM call outside a SELECT (e.g. a set operation's ORDER BY) is not supported: {text}")
    if an.has_ancestor(call, scope, (exp.Window,)):
        raise UnsupportedError(f"an LLM call inside a window function is not supported: {text}")
    clause = an.clause_of(call, scope)
    if clause == "joins":
        raise UnsupportedError(f"an LLM call in a JOIN condition is not supported (move it to WHERE): {text}")
    if clause not in _CLAUSES:
        raise UnsupportedError(f"an LLM call in the {clause.upper()} clause is not supported: {text}")
    if an.llm_function(call) == "llm_agg" and clause in ("where", "group"):
        raise UnsupportedError(f"llm_agg is an aggregate; it cannot appear in {_CLAUSES[clause]}: {text}")


def _check_uncorrelated(select: exp.Select) -> None:
    sources = set(an.source_names(select))
    for node in an.scope_nodes(select):
        if isinstance(node, exp.Column) and node.table and node.table not in sources:
            raise UnsupportedError(
                f"an LLM call in a correlated subquery is not supported (outer column {node.sql()})"
            )
