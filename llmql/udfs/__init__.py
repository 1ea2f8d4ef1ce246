"""LLM function specs, prompt rendering, typed parsing, the batch executor and result cache.

A call is a `CallSpec` (`llmql.udfs.call`): it renders its prompts, builds its engine
requests and parses its answers. Connectors run one with `llmql.udfs.run.run_spec`, which
dispatches to `llmql.udfs.executor.run_call` (row functions) or
`llmql.udfs.aggregate.run_agg` (llm_agg); see their docstrings.
"""

from llmql.udfs.call import CallSpec
from llmql.udfs.types import (
    FUNCTIONS,
    CallOptions,
    CallOutput,
    CallReport,
    OutputParseError,
    UDFError,
)

__all__ = [
    "FUNCTIONS",
    "CallOptions",
    "CallOutput",
    "CallReport",
    "CallSpec",
    "OutputParseError",
    "UDFError",
]
