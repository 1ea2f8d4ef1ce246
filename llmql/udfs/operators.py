"""The LLM functions as plain operators over columns (lists or Arrow), with typed outputs.

    out = llm_filter("Is this movie suitable for kids?", {"movie_info": [...], "review": [...]})
    out.values   # [True, False, None, ...]; out.report: CallReport

The same `run_call` / `run_agg` executor serves these, the DuckDB and Spark UDFs and the
pandas accessor; use these from Python when no SQL engine is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmql.engine.types import Engine
from llmql.udfs.aggregate import run_agg
from llmql.udfs.call import CallSpec
from llmql.udfs.executor import run_call
from llmql.udfs.types import CallOptions, CallReport

Columns = pa.Table | Mapping[str, Sequence[Any]]


@dataclass
class LLMOutput:
    """Values aligned with the input rows (one per group for llm_agg) and the call's report."""

    values: list[Any]
    report: CallReport


@dataclass
class MapOutput(LLMOutput):
    """llm: one string per row."""


@dataclass
class FilterOutput(LLMOutput):
    """llm_filter: one boolean per row (NULL where the input or the answer was unusable)."""


@dataclass
class ClassifyOutput(LLMOutput):
    """llm_classify: one of the labels per row."""


@dataclass
class ScoreOutput(LLMOutput):
    """llm_score: an integer in [lo, hi] per row."""


@dataclass
class ExtractOutput(LLMOutput):
    """llm_extract: a dict matching the schema per row."""


@dataclass
class AggOutput(LLMOutput):
    """llm_agg: one summary per group."""


def llm(
    instruction: str,
    inputs: Columns,
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> MapOutput:
    """Free-text answer per row."""
    return MapOutput(*_run("llm", instruction, inputs, options, engine))


def llm_filter(
    instruction: str,
    inputs: Columns,
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> FilterOutput:
    """Yes/no per row (constrained decoding)."""
    return FilterOutput(*_run("llm_filter", instruction, inputs, options, engine))


def llm_classify(
    instruction: str,
    labels: Sequence[str],
    inputs: Columns,
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> ClassifyOutput:
    """One of `labels` per row (constrained decoding)."""
    opts = _with(options, labels=tuple(labels))
    return ClassifyOutput(*_run("llm_classify", instruction, inputs, opts, engine))


def llm_score(
    instruction: str,
    lo: int,
    hi: int,
    inputs: Columns,
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> ScoreOutput:
    """An integer in [lo, hi] per row (constrained decoding)."""
    opts = _with(options, lo=lo, hi=hi)
    return ScoreOutput(*_run("llm_score", instruction, inputs, opts, engine))


def llm_extract(
    instruction: str,
    json_schema: dict | str,
    inputs: Columns,
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> ExtractOutput:
    """A dict matching `json_schema` per row."""
    opts = _with(options, json_schema=json_schema)
    return ExtractOutput(*_run("llm_extract", instruction, inputs, opts, engine))


def llm_agg(
    instruction: str,
    field: str,
    groups: Sequence[Sequence[Any]],
    options: CallOptions | None = None,
    *,
    engine: Engine | None = None,
) -> AggOutput:
    """One summary per group of `field` values."""
    spec = CallSpec("llm_agg", instruction, (field,), options or CallOptions())
    out = run_agg(spec, groups, engine=engine)
    return AggOutput(out.values.to_pylist(), out.report)


def _run(
    function: str,
    instruction: str,
    inputs: Columns,
    options: CallOptions | None,
    engine: Engine | None,
) -> tuple[list[Any], CallReport]:
    table = inputs if isinstance(inputs, pa.Table) else pa.table(dict(inputs))
    spec = CallSpec(function, instruction, tuple(table.column_names), options or CallOptions())
    out = run_call(spec, table, engine=engine)
    return out.values.to_pylist(), out.report


def _with(options: CallOptions | None, **changes: Any) -> CallOptions:
    base = {k: v for k, v in vars(options or CallOptions()).items()}
    base.update(changes)
    return CallOptions.from_dict(base)
