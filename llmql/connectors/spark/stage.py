"""One LLM call as a distributed Spark stage: distinct inputs → co-partition → mapInArrow.

Rows that share their leading prompt field land in the same partition: range-partitioned on
the field the reorderer puts first most often on a sample, or, for small inputs that the
sample holds whole, sorted on it and sliced on the driver. Each partition's batch so keeps
the long shared prefixes that the executor's per-partition reordering then exploits.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from llmql.connectors.spark.worker import WorkerContext, run_batch
from llmql.ordering import reorder
from llmql.udfs.call import CallSpec
from llmql.udfs.functions import validate
from llmql.udfs.types import CallReport

RESULT = "result"
_SAMPLE_ROWS = 512


def compute_results(
    inputs: Any,
    spec: CallSpec,
    ctx: WorkerContext,
    *,
    report: Any = None,
    partitions: int | None = None,
) -> Any:
    """Answer every row of `inputs` (distinct rows over `spec.fields`) on the workers.

    Args:
        inputs: a Spark DataFrame of distinct rows holding the columns `spec.fields`
            (for `llm_agg`, one row per group with the group's values as a list).
        spec: the validated call.
        ctx: settings and engine factory for the workers.
        report: a Spark accumulator of `CallReport` (see `report_accumulator`), or None.
        partitions: partitions to spread the work over (None = default parallelism).

    Returns:
        A checkpointed DataFrame with the columns of `inputs` plus `result`.
    """
    n = partitions or inputs.sparkSession.sparkContext.defaultParallelism
    sample = inputs.limit(_SAMPLE_ROWS + 1).toArrow()
    if sample.num_rows <= _SAMPLE_ROWS:
        parted = _from_driver(inputs, sample, spec, n)
    elif spec.function == "llm_agg":
        parted = inputs.repartition(n)  # NOTE: one row per group; nothing to co-locate
    else:
        # NOTE: range partitioning keeps equal leading values together, like hashing, but
        # balances rows across partitions (the slowest partition sets the stage's time)
        parted = inputs.repartitionByRange(n, *leading_fields(sample, spec.fields, spec.options.reorder_fields))
    out = parted.mapInArrow(_partition_fn(ctx, spec, report), result_schema(inputs.schema, spec))
    return out.localCheckpoint(eager=True)


def result_schema(input_schema: Any, spec: CallSpec) -> Any:
    """The Spark schema of a call's result table: the input columns plus `result`."""
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import StructField, StructType

    result_type = from_arrow_type(validate(spec).arrow_type(spec.options))
    return StructType([*input_schema.fields, StructField(RESULT, result_type, True)])


def leading_fields(sample: pa.Table, fields: tuple[str, ...], reorder_fields: bool = True) -> list[str]:
    """The field the reorderer most often sends first, judged on a sample of the inputs (the
    first written field when fields keep their written order)."""
    if len(fields) == 1 or sample.num_rows < 2 or not reorder_fields:
        return [fields[0]]
    ordering = reorder(sample.select(list(fields)), list(fields))
    firsts = Counter(order[0] for order in ordering.field_orders if order)
    return [firsts.most_common(1)[0][0]] if firsts else [fields[0]]


def _from_driver(inputs: Any, table: pa.Table, spec: CallSpec, n: int) -> Any:
    """Small inputs, already collected: sorted on the leading field and sliced into
    contiguous partitions, which saves Spark the shuffle and the input's recomputation."""
    from pyspark.sql.types import StructField, StructType

    if spec.function != "llm_agg" and table.num_rows > 1:
        with contextlib.suppress(pa.ArrowNotImplementedError):  # NOTE: nested types: unsorted
            table = table.sort_by([(leading_fields(table, spec.fields, spec.options.reorder_fields)[0], "ascending")])
    schema = StructType([StructField(f.name, f.dataType, True) for f in inputs.schema.fields])
    df = inputs.sparkSession.createDataFrame(table, schema=schema)
    return df.coalesce(n) if n < df.rdd.getNumPartitions() else df


def report_accumulator(spark: Any) -> Any:
    """A Spark accumulator that merges the workers' `CallReport`s."""
    return spark.sparkContext.accumulator(CallReport(), ReportParam())


def _partition_fn(ctx: WorkerContext, spec: CallSpec, report: Any):
    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        out = run_batch(ctx, spec, table)
        if report is not None:
            report.add(out.report)
        yield from table.append_column(RESULT, out.values).to_batches()

    return run_partition


try:
    from pyspark.accumulators import AccumulatorParam
except ImportError:  # pragma: no cover - pyspark is an optional extra
    AccumulatorParam = object  # type: ignore[assignment,misc]


class ReportParam(AccumulatorParam):  # type: ignore[misc]
    """Accumulates `CallReport`s (counts and per-stage seconds add up)."""

    def zero(self, value: CallReport) -> CallReport:
        return CallReport()

    def addInPlace(self, value1: CallReport, value2: CallReport) -> CallReport:
        return value1.merge(value2)
