"""Row and field ordering for prefix reuse: GGR, functional dependencies, an exact solver for
small tables, prefix-reuse metrics and bounds, and the one field renderer.

Knows neither SQL nor engines; `udfs` and `optimizer` both call it.
"""

from llmql.ordering.bounds import phc_upper_bound
from llmql.ordering.metrics import (
    PrefixMetrics,
    measure,
    prefix_metrics,
    render_prompt,
    render_prompts,
)
from llmql.ordering.render import render_cell, render_field, render_value
from llmql.ordering.reorder import reorder
from llmql.ordering.types import Ordering

__all__ = [
    "Ordering",
    "PrefixMetrics",
    "measure",
    "phc_upper_bound",
    "prefix_metrics",
    "render_cell",
    "render_field",
    "render_prompt",
    "render_prompts",
    "render_value",
    "reorder",
]
