"""Prefix-aware query optimizer: plan LLM calls in SQL, reorder inputs, measure prefix reuse."""

from llmql.optimizer.errors import PlanError, SQLParseError, UnknownColumnError, UnsupportedError
from llmql.optimizer.explain import explain
from llmql.optimizer.metrics import PrefixMetrics, measure, prefix_metrics, render_prompt
from llmql.optimizer.optimizer import RULES, optimize
from llmql.optimizer.planner import plan
from llmql.optimizer.reorder import reorder
from llmql.optimizer.types import LLMCall, LLMPlan, Ordering

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
