"""`%%llmql --spark`: the magic's query planned and run on Spark with `llmql.spark.run`."""

from __future__ import annotations

from typing import Any

__all__ = ["run_spark", "spark_session"]


def run_spark(args: Any, namespace: dict[str, Any]) -> tuple[Any, Any]:
    """Run `args.sql` (parameters already written in as literals) on the notebook's Spark
    session; returns (pandas result, QueryReport), or (None, None) after an EXPLAIN."""
    from IPython.display import display

    from llmql.connectors.notebook import _guarded, _Text

    spark = spark_session(namespace)
    views = _register_views(spark, args.sql, namespace)
    try:
        if args.explain:
            from llmql.optimizer import explain

            display(_Text(_guarded(lambda: explain(args.sql, dialect="spark"), spark=True)))
            return None, None
        return _guarded(lambda: _run(spark, args.sql), spark=True)
    finally:
        for name in views:
            spark.catalog.dropTempView(name)


def spark_session(namespace: dict[str, Any]) -> Any:
    """The namespace's `spark` SparkSession, else a local one (`llmql.spark.local_session`)."""
    candidate = namespace.get("spark")
    if type(candidate).__name__ == "SparkSession":
        return candidate
    from llmql.connectors.spark.session import local_session

    spark = local_session()
    namespace["spark"] = spark
    return spark


def _run(spark: Any, sql: str) -> tuple[Any, Any]:
    from llmql.connectors.spark.plan import run

    result = run(spark, sql)
    return result.df.toPandas(), result.report


def _register_views(spark: Any, sql: str, namespace: dict[str, Any]) -> list[str]:
    """Temp views for the pandas/Spark DataFrames the query reads by name (not in the catalog)."""
    from llmql.connectors.notebook import referenced_frames

    known = {t.name.lower() for t in spark.catalog.listTables()}
    frames = referenced_frames(sql, namespace, known, spark=True)
    for name, frame in frames.items():
        df = frame if type(frame).__module__.startswith("pyspark") else spark.createDataFrame(frame)
        df.createOrReplaceTempView(name)
    return list(frames)
