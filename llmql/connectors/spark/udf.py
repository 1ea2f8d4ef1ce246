"""Arrow-batched Spark UDFs over the udfs executor (dedup and reorder per Arrow batch).

SQL form, after `register(spark)` (the DuckDB connector's argument conventions)::

    SELECT llm_filter('Is this movie suitable for kids?', movie_info, review_content) FROM t
    SELECT llm_classify('Sentiment?', array('pos', 'neg'), review_content) FROM t
    SELECT llm_score('Rate the review.', 1, 5, review_content) FROM t
    SELECT llm('Summarise.', struct(movie_title, review_content)) FROM t
    SELECT movie_title, llm_agg('Summarise the reviews.', review_content) FROM t GROUP BY 1

Spark does not pass column names to Python UDFs: one STRUCT argument names the prompt
fields, otherwise they are `input`, `input1`, `input2`, ... `llmql.spark.sql` and
`llmql.spark.functions` use the real column names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmql.connectors.spark.worker import EngineFactory, WorkerContext, run_batch, run_sql_udf
from llmql.udfs.call import CallSpec
from llmql.udfs.functions import validate
from llmql.udfs.types import FUNCTIONS, CallOptions, CallReport, UDFError

ROW_FUNCTIONS = ("llm", "llm_filter", "llm_classify", "llm_score", "llm_extract")
_SQL_TYPES = {
    "llm": "string",
    "llm_filter": "boolean",
    "llm_classify": "string",
    "llm_score": "bigint",
    "llm_extract": "string",
    "llm_agg": "string",
}


@dataclass
class SparkRegistration:
    """What `register()` installed; `last_report()` sums the UDF calls since the last one."""

    names: list[str]
    accumulator: Any

    def last_report(self) -> CallReport:
        """The workers' combined report of the UDF calls since the previous `last_report()`
        (successful tasks only, as Spark applies accumulator updates)."""
        report, self.accumulator.value = self.accumulator.value, CallReport()
        return report


def register(
    spark: Any,
    *,
    engine_factory: EngineFactory | None = None,
    settings: dict | None = None,
    prefix: str = "",
    **options: Any,
) -> list[str]:
    """Register llm, llm_filter, llm_classify, llm_score, llm_extract and llm_agg on `spark`.

    Args:
        spark: a SparkSession.
        engine_factory: a picklable zero-argument callable returning an Engine for the
            workers; None loads the settings' model in each Python worker (once per worker).
        settings: overrides of `llmql.settings.Settings` shipped to the workers.
        prefix: prepended to each SQL function name.
        **options: CallOptions applied to every call (max_tokens, temperature, ...).

    Returns:
        SparkRegistration: the registered SQL function names and their report.
        `llm_extract` returns JSON text in SQL (use `llmql.spark.functions.llm_extract` for a
        STRUCT column); `llm_agg` is a grouped aggregate that summarises each group
        separately.
    """
    from llmql.connectors.spark.stage import report_accumulator

    CallOptions.from_dict(options)
    ctx = WorkerContext.capture(engine_factory, workers=_parallelism(spark), **(settings or {}))
    accumulator = report_accumulator(spark)
    for function in FUNCTIONS:
        spark.udf.register(prefix + function, sql_udf(function, ctx, options, accumulator))
    return SparkRegistration([prefix + f for f in FUNCTIONS], accumulator)


def sql_udf(
    function: str, ctx: WorkerContext, options: dict | None = None, accumulator: Any = None
) -> Any:
    """The Arrow UDF of `function` for SQL (a grouped aggregate for `llm_agg`); reports go
    to `accumulator` (a `report_accumulator`) when given."""
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    options = dict(options or {})
    collector = None if accumulator is None else _Collector(accumulator)
    if function == "llm_agg":

        def aggregate(instruction: pa.Array, values: pa.Array) -> str | None:
            args = (instruction[:1], pa.array([values.to_pylist()]))
            return run_sql_udf(ctx, function, options, args, collector)[0].as_py()

        with warnings.catch_warnings():  # NOTE: pyspark prefers type hints; ours are strings
            warnings.simplefilter("ignore", UserWarning)
            return arrow_udf(aggregate, _SQL_TYPES[function], ArrowUDFType.GROUPED_AGG)

    def evaluate(*args: pa.Array) -> pa.Array:
        return run_sql_udf(ctx, function, options, args, collector)

    return arrow_udf(evaluate, _SQL_TYPES[function])


def column_udf(spec: CallSpec, ctx: WorkerContext) -> Any:
    """An Arrow UDF over the columns of `spec.fields`, typed by the function (STRUCT for
    llm_extract); the spec is validated here, on the driver, before any model call."""
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.pandas.types import from_arrow_type

    return_type = from_arrow_type(validate(spec).arrow_type(spec.options))
    fields = spec.fields

    def evaluate(*cols: pa.Array) -> pa.Array:
        return run_batch(ctx, spec, pa.table(dict(zip(fields, cols)))).values

    return arrow_udf(evaluate, return_type)


def make_spec(
    function: str, instruction: str, fields: Sequence[str], options: dict, *, rows: bool = True
) -> CallSpec:
    """A validated CallSpec (UDFError for unknown functions or bad options); `rows` refuses
    the aggregate `llm_agg`."""
    known = ROW_FUNCTIONS if rows else FUNCTIONS
    if function not in known:
        raise UDFError(f"{function!r} is not a row LLM function; known: {list(known)}")
    spec = CallSpec(function, instruction, tuple(fields), CallOptions.from_dict(options))
    validate(spec)
    return spec


class _Collector:
    """The `collector` interface of `udfs.vectorized.make_udf` over a Spark accumulator."""

    def __init__(self, accumulator: Any) -> None:
        self.accumulator = accumulator

    def add(self, report: CallReport) -> None:
        self.accumulator.add(report)


def _parallelism(spark: Any) -> int:
    master = spark.sparkContext.master
    return spark.sparkContext.defaultParallelism if master.startswith("local") else 0
