"""The rule driver: copy the tree once, then run each rule of `RULES` in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlglot import exp

from llmql.optimizer.expand_llm_stars import expand_llm_stars
from llmql.optimizer.order_llm_filters import order_llm_filters
from llmql.optimizer.push_limit_below_llm_calls import push_limit_below_llm_calls
from llmql.optimizer.rewrite_llm_lookups import rewrite_llm_lookups
from llmql.optimizer.types import LLMCall, Source
from llmql.optimizer.validate_llm_calls import validate_llm_calls

Rule = Callable[..., exp.Expression]

RULES: tuple[Rule, ...] = (
    validate_llm_calls,
    expand_llm_stars,
    order_llm_filters,
    push_limit_below_llm_calls,
    rewrite_llm_lookups,
)


def optimize(
    expression: exp.Expression,
    *,
    dialect: str = "duckdb",
    calls: list[LLMCall] | None = None,
    sources: list[Source] | None = None,
    rules: Sequence[Rule] = RULES,
) -> exp.Expression:
    """Run `rules` over a copy of `expression`; planned calls are appended to `calls`.

    Args:
        expression: a parsed query (not modified).
        dialect: "duckdb" or "spark"; the dialect of the generated input relations.
        calls: collects the `LLMCall` steps, in execution order.
        sources: collects the relations to materialise before the calls.
        rules: the rules to run, in order.

    Returns:
        The rewritten query, which reads the calls' result tables instead of calling models.
    """
    expression = expression.copy()
    calls = [] if calls is None else calls
    sources = [] if sources is None else sources
    for rule in rules:
        expression = rule(expression, dialect=dialect, calls=calls, sources=sources)
    return expression
