"""Prefix-aware query optimizer: plan LLM calls in SQL (sqlglot rules).

`reorder`, `measure`, `prefix_metrics`, `render_prompt`, `Ordering` and `PrefixMetrics` are
re-exported from `llmql.ordering`, where they live.
"""

from llmql.optimizer.errors import PlanError, SQLParseError, UnknownColumnError, UnsupportedError
from llmql.optimizer.explain import explain
from llmql.optimizer.optimizer import RULES, optimize
from llmql.optimizer.planner import plan
from llmql.optimizer.types import LLMCall, LLMPlan
from llmql.ordering import Ordering, PrefixMetrics, measure, prefix_metrics, render_prompt, reorder

__all__ = [
    "RULES",
    "LLMCall",
    "LLMPlan",
    "Ordering",
    "PlanError",
    "PrefixMetrics",
    "SQLParseError",
    "UnknownColumnError",
    "UnsupportedError",
    "explain",
    "measure",
    "optimize",
    "plan",
    "prefix_metrics",
    "render_prompt",
    "reorder",
]
