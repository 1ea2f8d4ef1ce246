"""Vectorised (Arrow-in, Arrow-out) UDF bodies for SQL engines that call Python per batch.

A SQL call `llm_classify('…', ['a', 'b'], col1, col2)` arrives as Arrow arrays, one per
argument. The body checks the constant arguments, names the fields (a single STRUCT argument
gives its field names; otherwise `input`, or `input1`, `input2`, ...), runs the executor on
the batch (dedup + reorder inside it) and returns one value per row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from llmql.engine.types import Engine
from llmql.udfs.call import CallSpec
from llmql.udfs.run import run_spec
from llmql.udfs.types import FUNCTIONS, CallOptions, CallReport, UDFError

# NOTE: constant arguments after the instruction, per function, before the columns.
_CONSTANTS = {
    "llm_classify": ("labels",),
    "llm_score": ("lo", "hi"),
    "llm_extract": ("json_schema",),
}
SQL_TYPES = {
    "llm": "VARCHAR",
    "llm_filter": "BOOLEAN",
    "llm_classify": "VARCHAR",
    "llm_score": "BIGINT",
    "llm_extract": "VARCHAR",
    "llm_agg": "VARCHAR",
}


@dataclass
class ReportCollector:
    """Accumulates the reports of UDF calls (thread-safe); `take()` returns and resets."""

    report: CallReport = field(default_factory=CallReport)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, report: CallReport) -> None:
        with self._lock:
            self.report.merge(report)

    def take(self) -> CallReport:
        with self._lock:
            out, self.report = self.report, CallReport()
            return out


def make_udf(
    function: str,
    options: dict[str, Any] | None = None,
    *,
    engine: Engine | None = None,
    collector: ReportCollector | None = None,
) -> Callable[..., pa.Array]:
    """The Arrow UDF body of `function` with fixed `options` (validated now)."""
    if function not in FUNCTIONS:
        raise UDFError(f"unknown LLM function {function!r}; known: {list(FUNCTIONS)}")
    base = dict(options or {})
    CallOptions.from_dict(base)

    def udf(*args: pa.Array) -> pa.Array:
        spec, inputs = _bind(function, base, args)
        out = run_spec(spec, inputs, engine=engine)
        values = out.values
        if function == "llm_extract":
            values = pa.array([None if v is None else json.dumps(v) for v in values.to_pylist()])
        if collector is not None:
            collector.add(out.report)
        return values

    udf.__name__ = function
    return udf


def _bind(function: str, options: dict[str, Any], args: tuple) -> tuple[CallSpec, pa.Table]:
    names = _CONSTANTS.get(function, ())
    if len(args) < 2 + len(names):
        raise UDFError(
            f"{function} needs an instruction, {list(names) or ''} and at least one column"
        )
    instruction = _constant(function, "instruction", args[0])
    consts = {n: _constant(function, n, a) for n, a in zip(names, args[1 : 1 + len(names)])}
    columns = args[1 + len(names) :]
    if function == "llm_agg" and len(columns) != 1:
        raise UDFError("llm_agg takes an instruction and one column")
    spec_options = CallOptions.from_dict({**options, **consts})
    inputs = _inputs(columns)
    if not isinstance(instruction, str):
        raise UDFError(f"{function}: the instruction must be a constant string")
    return CallSpec(function, instruction, tuple(inputs.column_names), spec_options), inputs


def _constant(function: str, name: str, array: Any) -> Any:
    values = array.to_pylist() if hasattr(array, "to_pylist") else [array]
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
    if len(distinct) > 1:
        raise UDFError(f"{function}: the {name} must be a constant, not a column")
    return values[0] if values else None


def _inputs(columns: tuple) -> pa.Table:
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    if len(arrays) == 1 and pa.types.is_struct(arrays[0].type):
        struct = arrays[0]
        return pa.table(dict(zip([f.name for f in struct.type], struct.flatten())))
    if len(arrays) == 1:
        return pa.table({"input": arrays[0]})
    return pa.table({f"input{i + 1}": a for i, a in enumerate(arrays)})
