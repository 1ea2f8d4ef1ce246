"""Spark connector: run a query's optimizer plan on distributed Spark DataFrames.

`run(spark, sql)` plans the query (`llmql.optimizer.plan(sql, dialect="spark")`), checks
every stage before any model call (unknown columns, functions, options), then for each LLM
call runs its `input_sql` as a DataFrame (pushdown + dedup), answers the distinct inputs on
the workers (`spark_stage.compute_results`), registers them as the call's `result_table`
temp view, and finally runs the rewritten `final_sql`, so SQL semantics stay Spark's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmql.connectors.spark_stage import compute_results, report_accumulator, result_schema
from llmql.connectors.spark_udf import make_spec, register
from llmql.connectors.spark_worker import EngineFactory, WorkerContext
from llmql.optimizer.types import LLMCall, LLMPlan
from llmql.udfs.report import QueryReport
from llmql.udfs.types import CallSpec, UDFError, new_tenant

__all__ = ["SparkQueryResult", "register", "run", "run_plan", "sql"]


@dataclass
class SparkQueryResult:
    """The result DataFrame of a query, its plan (None when run as plain UDFs) and report."""

    df: Any
    plan: LLMPlan | None
    report: QueryReport = field(default_factory=QueryReport)


def sql(spark: Any, query: str, **kwargs: Any) -> Any:
    """Run `query` with its LLM calls optimised and distributed; returns a DataFrame.

    Keyword arguments are those of `run`.
    """
    return run(spark, query, **kwargs).df


def run(
    spark: Any,
    query: str,
    *,
    engine_factory: EngineFactory | None = None,
    partitions: int | None = None,
    settings: dict | None = None,
    **options: Any,
) -> SparkQueryResult:
    """Plan `query` for Spark and run it (see `run_plan`); UDFError, UnknownColumnError or
    SQLParseError are raised before any model call."""
    from llmql.optimizer import UnsupportedError, plan

    report = QueryReport()
    try:
        planned = report.timed("plan", lambda: plan(query, "spark", schema=_schema(spark, query)))
    except UnsupportedError:
        # NOTE: as in the DuckDB connector, queries the planner cannot rewrite run per batch
        register(spark, engine_factory=engine_factory, settings=settings, **options)
        return SparkQueryResult(spark.sql(query), None, report)
    result = run_plan(
        spark, planned, engine_factory=engine_factory, partitions=partitions, settings=settings,
        **options,
    )
    result.report.seconds.update(report.seconds)
    return result


def run_plan(
    spark: Any,
    plan: LLMPlan,
    *,
    engine_factory: EngineFactory | None = None,
    partitions: int | None = None,
    settings: dict | None = None,
    **options: Any,
) -> SparkQueryResult:
    """Run an `LLMPlan` on `spark`.

    Args:
        spark: a SparkSession; the query's tables must be visible to `spark.sql`.
        plan: the optimizer's plan (calls in execution order, then `final_sql`).
        engine_factory: a picklable zero-argument callable returning an Engine for workers;
            None loads the settings' model once per Python worker.
        partitions: partitions per LLM stage (None = Spark's default parallelism).
        settings: overrides of `llmql.settings.Settings` shipped to the workers.
        **options: default CallOptions of every call (max_tokens, chunk_size, ...).

    Returns:
        SparkQueryResult: the final DataFrame (lazy over materialised LLM results) and a
        `CallReport` per call id.

    Raises:
        UDFError: bad function arguments or options, before any model call.
        pyspark AnalysisException: unknown tables, columns or functions, before any model call.
    """
    workers = spark.sparkContext.defaultParallelism
    ctx = WorkerContext.capture(engine_factory, workers=workers, **(settings or {}))
    job = {"tenant": new_tenant("job"), **options}  # NOTE: one tenant per job unless set
    specs = {call.id: _spec(call, job) for call in plan.calls}
    check_plan(spark, plan, specs)
    result = SparkQueryResult(df=None, plan=plan)
    for source in plan.sources:
        # NOTE: checkpointed, so every later stage reads the same rows
        spark.sql(source.sql).localCheckpoint().createOrReplaceTempView(source.name)
    for call in plan.calls:
        accumulator = report_accumulator(spark)
        t0 = time.perf_counter()
        inputs = spark.sql(call.input_sql)
        out = compute_results(
            inputs, specs[call.id], ctx, report=accumulator, partitions=partitions
        )
        out.createOrReplaceTempView(call.result_table)
        seconds = time.perf_counter() - t0
        result.report.add_call(call.id, call.function, accumulator.value, seconds)
    result.df = result.report.timed("final_sql", lambda: spark.sql(plan.final_sql))
    return result


def check_plan(spark: Any, plan: LLMPlan, specs: dict[str, CallSpec]) -> None:
    """Analyse every stage against empty stand-ins for the result tables (no model call)."""
    for source in plan.sources:
        spark.sql(source.sql).createOrReplaceTempView(source.name)
    for call in plan.calls:
        inputs = spark.sql(call.input_sql)
        missing = [f for f in call.fields if f not in inputs.columns]
        if missing:
            raise UDFError(f"{call.id}: input_sql lacks field(s) {missing}")
        schema = result_schema(inputs.schema, specs[call.id])
        spark.createDataFrame([], schema).createOrReplaceTempView(call.result_table)
    spark.sql(plan.final_sql)


def _spec(call: LLMCall, defaults: dict) -> CallSpec:
    return make_spec(call.function, call.instruction, call.fields, call.call_options(defaults),
                     rows=False)


def _schema(spark: Any, query: str) -> dict[str, dict[str, str]]:
    """`{table: {column: type}}` of the tables and views `query` reads (looked up by name,
    so large catalogs are not listed)."""
    import sqlglot
    from sqlglot import exp

    try:
        names = {t.name for t in sqlglot.parse_one(query, read="spark").find_all(exp.Table)}
    except sqlglot.errors.ParseError:
        return {}  # NOTE: the planner reports the parse error with line and column
    schema: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        if name and spark.catalog.tableExists(name):
            fields = spark.table(name).schema.fields
            schema[name] = {f.name: f.dataType.simpleString() for f in fields}
    return schema

