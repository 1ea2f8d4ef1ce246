"""Rule: move every LLM call into a plan step and look its result up in the query."""

from __future__ import annotations

from sqlglot import exp

from llmql.optimizer import analysis as an
from llmql.optimizer.errors import UnsupportedError
from llmql.optimizer.relations import (
    GROUP_KEY,
    RESULT,
    input_relation,
    list_aggregate,
    lookup_join,
)
from llmql.optimizer.types import LLMCall


def rewrite_llm_lookups(
    expression: exp.Expression,
    *,
    dialect: str = "duckdb",
    calls: list[LLMCall] | None = None,
    **_: object,
) -> exp.Expression:
    """Replace each LLM call by a lookup of its result table; append its plan step to `calls`.

    Each SELECT with LLM calls gets one `LEFT JOIN` per distinct call, on the call's
    arguments with IS NOT DISTINCT FROM. Calls in WHERE are filters: each one's input
    relation holds the rows that passed the non-LLM conjuncts and all earlier LLM filters.
    Inner queries (CTEs, subqueries) are planned before the queries that read them.

    >>> import sqlglot
    >>> sql = "SELECT id FROM t WHERE x > 1 AND llm_filter('Good?', a)"
    >>> out = []
    >>> print(rewrite_llm_lookups(sqlglot.parse_one(sql), calls=out).sql(pretty=True))
    SELECT
      id
    FROM t
    LEFT JOIN (
      SELECT
        a AS __llmql_k0,
        result AS __llmql_result
      FROM llmql_llm_0
    ) AS _llmql_llm_0
      ON a IS NOT DISTINCT FROM _llmql_llm_0.__llmql_k0
    WHERE
      x > 1 AND _llmql_llm_0.__llmql_result
    >>> out[0].input_sql
    'SELECT DISTINCT a AS a FROM t WHERE x > 1'
    """
    calls = [] if calls is None else calls
    for select in an.selects_post_order(expression):
        if an.scope_calls(select):
            _ScopeRewriter(select, dialect, calls).run()
    return expression


class _ScopeRewriter:
    """Rewrites the LLM calls of one SELECT (its nested queries are already rewritten)."""

    def __init__(self, select: exp.Select, dialect: str, calls: list[LLMCall]):
        self.select, self.dialect, self.calls = select, dialect, calls
        self.joins: list[exp.Join] = []  # lookup joins, in creation order
        self.applied: list[exp.Expression] = []  # WHERE conjuncts applied so far
        self.lookups: dict[str, tuple[str, exp.Expression]] = {}  # call SQL -> (id, replacement)
        self.filter_ids: list[str] = []
        self.aggregated = an.is_aggregate_select(select)

    def run(self) -> None:
        """Plan WHERE filters in order, then row-level calls, then llm_agg calls."""
        if not self.select.args.get("from_"):
            self.select.set("from_", exp.From(this=exp.maybe_parse("(SELECT 1 AS __llmql_one) AS __llmql_dual")))
        self._keep_output_names()
        parts = an.conjuncts(self.select.args.get("where"))
        self.applied = [c for c in parts if not an.scope_calls(c, self.select)]
        for cond in [c for c in parts if an.scope_calls(c, self.select)]:
            for call in an.scope_calls(cond, self.select):
                looked_up = self._row_call(call, is_filter=True)
                # NOTE: a conjunct that is the call itself is detached by the replacement;
                # later input relations must apply the lookup, never the LLM call again.
                cond = looked_up if call is cond else cond
            self.applied.append(cond)
        remaining = an.scope_calls(self.select)
        for call in [c for c in remaining if an.llm_function(c) != "llm_agg"]:
            self._row_call(call, is_filter=False)
        for call in an.scope_calls(self.select):
            self._agg_call(call)
        self.select.set("joins", (self.select.args.get("joins") or []) + self.joins)

    def _keep_output_names(self) -> None:
        """Alias unaliased select items with LLM calls by their text, as the engine names them."""
        for item in self.select.expressions:
            if not isinstance(item, (exp.Alias, exp.Column, exp.Star)) and an.scope_calls(item, self.select):
                name = item.sql(dialect=self.dialect, normalize_functions=False)
                item.replace(exp.alias_(item.copy(), name, quoted=True))

    def _row_call(self, call: exp.Anonymous, *, is_filter: bool) -> exp.Expression:
        key = call.sql(dialect=self.dialect)
        if key not in self.lookups:
            spec = an.parse_call(call)
            if any(an.llm_function(n) == "llm_agg" for a in spec.args for n in a.walk()):
                raise UnsupportedError(f"an LLM call over llm_agg's result is not supported: {key}")
            projections = [exp.alias_(a.copy(), f) for a, f in zip(spec.args, spec.fields)]
            relation = input_relation(self.select, projections, self.joins, self.applied)
            call_id = self._add(spec, relation, is_filter, {})
            self.joins.append(lookup_join(f"llmql_{call_id}", f"_llmql_{call_id}", list(spec.fields), list(spec.args)))
            self.lookups[key] = (call_id, exp.column(RESULT, f"_llmql_{call_id}"))
        replacement = self.lookups[key][1].copy()
        clause = an.clause_of(call, self.select)
        if self.aggregated and clause not in ("where", "group") and not an.inside_aggregate(call, self.select):
            self._group_by(replacement, key)
        call.replace(replacement)
        return replacement

    def _agg_call(self, call: exp.Anonymous) -> None:
        key = call.sql(dialect=self.dialect)
        if key not in self.lookups:
            spec = an.parse_call(call)
            if an.has_ancestor(call, self.select, (exp.AggFunc,)):
                raise UnsupportedError(f"llm_agg nested in another aggregate is not supported: {key}")
            groups = self._group_keys(key)
            names = [GROUP_KEY.format(i) for i in range(len(groups))]
            projections = [exp.alias_(g.copy(), n) for g, n in zip(groups, names)]
            projections.append(exp.alias_(list_aggregate(spec.args[0], self.dialect), spec.fields[0]))
            relation = input_relation(self.select, projections, self.joins, self.applied, group=groups or None)
            if not groups:
                relation.set("distinct", None)
            options = {"aggregate": True, "group_keys": names}
            call_id = self._add(spec, relation, False, options)
            self.joins.append(lookup_join(f"llmql_{call_id}", f"_llmql_{call_id}", names, groups))
            self.lookups[key] = (call_id, exp.Max(this=exp.column(RESULT, f"_llmql_{call_id}")))
        call.replace(self.lookups[key][1].copy())

    def _add(self, spec: an.ParsedCall, relation: exp.Select, is_filter: bool, extra: dict) -> str:
        call_id = f"llm_{len(self.calls)}"
        tables = {t.name for t in relation.find_all(exp.Table)}
        depends = tuple(c.id for c in self.calls if c.result_table in tables)
        options = {**spec.options, **extra}
        self.calls.append(
            LLMCall(
                id=call_id,
                function=spec.function,
                instruction=spec.instruction,
                fields=spec.fields,
                input_sql=relation.sql(dialect=self.dialect),
                result_table=f"llmql_{call_id}",
                options=options,
                depends_on=depends,
                is_filter=is_filter,
            )
        )
        return call_id

    def _group_by(self, replacement: exp.Expression, key: str) -> None:
        group = self.select.args.get("group")
        if group is None or _grouping_sets(group):
            what = "a global aggregate" if group is None else "GROUPING SETS/ROLLUP/CUBE"
            raise UnsupportedError(f"an LLM call outside an aggregate in {what} is not supported: {key}")
        group.append("expressions", replacement.copy())

    def _group_keys(self, key: str) -> list[exp.Expression]:
        group = self.select.args.get("group")
        if group is None:
            return []
        if _grouping_sets(group) or group.args.get("all"):
            raise UnsupportedError(f"llm_agg with GROUPING SETS/ROLLUP/CUBE/ALL is not supported: {key}")
        return [self._resolve_group_key(g) for g in group.expressions]

    def _resolve_group_key(self, node: exp.Expression) -> exp.Expression:
        """GROUP BY ordinals and select-list aliases resolved to their expressions."""
        items = self.select.expressions
        if isinstance(node, exp.Literal) and not node.is_string:
            return items[int(node.name) - 1].unalias()
        if isinstance(node, exp.Column) and not node.table:
            for item in items:
                if isinstance(item, exp.Alias) and item.alias == node.name:
                    return item.this
        return node


def _grouping_sets(group: exp.Group) -> bool:
    kinds = (exp.Rollup, exp.Cube, exp.GroupingSets)
    return any(group.args.get(k) for k in ("grouping_sets", "cube", "rollup")) or any(
        isinstance(g, kinds) for g in group.expressions
    )
