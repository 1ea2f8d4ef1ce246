"""LLM function specs, prompt rendering, typed parsing, the batch executor and result cache.

Connectors call `llmql.udfs.executor.run_call` (row functions) and
`llmql.udfs.aggregate.run_agg` (llm_agg); see their docstrings.
"""

from llmql.udfs.types import (
    FUNCTIONS,
    CallOptions,
    CallOutput,
    CallReport,
    CallSpec,
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
