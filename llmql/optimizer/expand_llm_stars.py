"""Rule: qualify `SELECT *` in queries whose LLM calls will add lookup joins."""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer import analysis as an
from llmql.optimizer.errors import UnsupportedError


def expand_llm_stars(expression: exp.Expression, **_: object) -> exp.Expression:
    """Turn `*` into `source.*` for each FROM/JOIN source of a SELECT with LLM calls.

    The lookup joins added by `rewrite_llm_lookups` must not show up in `*`.

    >>> import sqlglot
    >>> sql = "SELECT * FROM t AS a JOIN u ON a.id = u.id WHERE llm_filter('Good?', a.x)"
    >>> expand_llm_stars(sqlglot.parse_one(sql)).sql()
    "SELECT a.*, u.* FROM t AS a JOIN u ON a.id = u.id WHERE LLM_FILTER('Good?', a.x)"
    """
    for select in an.selects_post_order(expression):
        stars = [e for e in select.expressions if isinstance(e, exp.Star)]
        if not stars or not an.scope_calls(select) or not select.args.get("from_"):
            continue
        if any(s.args.get(k) for s in stars for k in ("except_", "except", "replace", "rename")):
            raise UnsupportedError("SELECT * EXCLUDE/REPLACE together with an LLM call is not supported")
        joins = select.args.get("joins") or []
        if any(j.args.get("using") or j.method.upper() == "NATURAL" for j in joins):
            raise UnsupportedError("SELECT * over a USING/NATURAL join together with an LLM call is not supported")
        names = an.source_names(select)
        if not all(names):
            raise UnsupportedError("SELECT * over an unaliased subquery together with an LLM call is not supported")
        items: list[exp.Expression] = []
        for e in select.expressions:
            items.extend(_qualified_stars(names) if isinstance(e, exp.Star) else [e])
        select.set("expressions", items)
    return expression


def _qualified_stars(names: list[str]) -> list[exp.Expression]:
    return [exp.Column(this=exp.Star(), table=exp.to_identifier(n)) for n in names]
