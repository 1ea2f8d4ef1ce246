"""`run_spec`: the one entry point connectors use to run a call over a table of inputs."""

from __future__ import annotations

import pyarrow as pa

from llmql.engine.types import Engine
from llmql.udfs.aggregate import run_agg
from llmql.udfs.call import CallSpec
from llmql.udfs.executor import run_call
from llmql.udfs.types import CallOutput


def run_spec(
    spec: CallSpec, table: pa.Table, *, engine: Engine | None = None, progress: bool | None = None
) -> CallOutput:
    """Run one call: `run_agg` over the lists in column `spec.fields[0]` for llm_agg (one
    summary per row of `table`), else `run_call` (one answer per row).

    Args:
        spec: the call.
        table: its inputs, one column per field.
        engine: the engine to use; None loads the process's shared one for the call's model.
        progress: show a progress bar (None = settings.progress).
    """
    if spec.function == "llm_agg":
        groups = [g or [] for g in table.column(spec.fields[0]).to_pylist()]
        return run_agg(spec, groups, engine=engine, progress=progress)
    return run_call(spec, table, engine=engine, progress=progress)
