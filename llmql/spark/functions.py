"""PySpark-style column functions and `df.transform` helpers for LLM calls.

    from llmql.spark import functions as L
    df.withColumn("kids", L.llm_filter("Is this movie suitable for kids?",
                                       "movie_info", "review_content"))
    df.transform(L.where_llm("Is this movie suitable for kids?", "movie_info", "review_content"))

Column functions run the udfs executor per Arrow batch (dedup and reorder inside each
batch). The `transform` helpers run the whole column at once like `llmql.spark.sql`:
distinct inputs, partitioned so rows sharing their leading field stay together, then
joined back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from llmql.connectors.spark.stage import RESULT, compute_results
from llmql.connectors.spark.udf import column_udf, make_spec
from llmql.connectors.spark.worker import WorkerContext, default_engine_factory

__all__ = [
    "llm",
    "llm_classify",
    "llm_extract",
    "llm_filter",
    "llm_score",
    "where_llm",
    "with_llm",
]

ColumnOrName = Any  # str | pyspark.sql.Column
Transform = Callable[[Any], Any]


def llm(instruction: str, *cols: ColumnOrName, **options: Any) -> Any:
    """Free-text answer per row (STRING). Options are `CallOptions` fields."""
    return _column("llm", instruction, cols, options)


def llm_filter(instruction: str, *cols: ColumnOrName, **options: Any) -> Any:
    """Yes/no answer per row (BOOLEAN)."""
    return _column("llm_filter", instruction, cols, options)


def llm_classify(
    instruction: str, *cols: ColumnOrName, labels: list[str], **options: Any
) -> Any:
    """One of `labels` per row (STRING)."""
    return _column("llm_classify", instruction, cols, {**options, "labels": labels})


def llm_score(
    instruction: str, *cols: ColumnOrName, lo: int = 1, hi: int = 5, **options: Any
) -> Any:
    """An integer in [lo, hi] per row (BIGINT)."""
    return _column("llm_score", instruction, cols, {**options, "lo": lo, "hi": hi})


def llm_extract(
    instruction: str, *cols: ColumnOrName, json_schema: dict | str, **options: Any
) -> Any:
    """A STRUCT matching `json_schema` per row."""
    return _column("llm_extract", instruction, cols, {**options, "json_schema": json_schema})


def with_llm(
    name: str, function: str, instruction: str, *cols: str, **options: Any
) -> Transform:
    """`df.transform(with_llm("kids", "llm_filter", "...", "movie_info"))` adds column
    `name` with the call's result, computed once per distinct input across the cluster."""
    spec = make_spec(function, instruction, cols, options)

    def transform(df: Any) -> Any:
        ctx = _context(df.sparkSession)
        results = compute_results(df.select(*spec.fields).distinct(), spec, ctx)
        joined = df.join(results.withColumnRenamed(RESULT, name), on=list(spec.fields), how="left")
        return joined.select(*df.columns, name)  # NOTE: NULL inputs find no match: NULL

    return transform


def where_llm(instruction: str, *cols: str, **options: Any) -> Transform:
    """`df.transform(where_llm("Is it for kids?", "movie_info"))` keeps rows answered yes."""
    marker = "__llmql_keep"

    def transform(df: Any) -> Any:
        kept = df.transform(with_llm(marker, "llm_filter", instruction, *cols, **options))
        return kept.where(kept[marker]).drop(marker)

    return transform


def _column(function: str, instruction: str, cols: tuple, options: dict) -> Any:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    names = [column_name(c) for c in cols]
    spec = make_spec(function, instruction, names, options)
    udf = column_udf(spec, _context(SparkSession.getActiveSession()))
    return udf(*[F.col(c) if isinstance(c, str) else c for c in cols])


def _context(spark: Any) -> WorkerContext:
    workers = spark.sparkContext.defaultParallelism if spark is not None else 0
    return WorkerContext.capture(default_engine_factory(), workers=workers)


def column_name(col: ColumnOrName) -> str:
    """The prompt field name of a column: its name, or its alias (`F.col("a").alias("b")`)."""
    if isinstance(col, str):
        return col
    match = re.fullmatch(r"Column<'(.*)'>", str(col), flags=re.S)
    text = match.group(1) if match else str(col)
    return re.split(r"\s+AS\s+", text)[-1].strip("`")
