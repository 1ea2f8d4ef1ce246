"""Rule: an LLM call's input relation yields each distinct argument row once."""

from __future__ import annotations

from sqlglot import exp


def deduplicate_inputs(expression: exp.Select, **_: object) -> exp.Select:
    """Make an input relation `SELECT DISTINCT`, so the model sees each input once.

    >>> import sqlglot
    >>> deduplicate_inputs(sqlglot.parse_one("SELECT a AS a FROM t WHERE b > 1")).sql()
    'SELECT DISTINCT a AS a FROM t WHERE b > 1'
    """
    if isinstance(expression, exp.Select) and not expression.args.get("distinct"):
        expression.set("distinct", exp.Distinct())
    return expression
