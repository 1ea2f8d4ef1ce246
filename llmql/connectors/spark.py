"""Spark connector: run a query's optimizer plan on distributed Spark DataFrames.

`run(spark, sql)` plans the query (`llmql.optimizer.plan(sql, dialect="spark")`), checks
every stage before any model call (unknown columns, functions, options), then for each LLM
call runs its `input_sql` as a DataFrame (pushdown + dedup), answers the distinct inputs on
the workers (`spark_stage.compute_results`), registers them as the call's `result_table`
temp view, and finally runs the rewritten `final_sql`, so SQL semantics stay Spark's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmql.connectors.spark_stage import compute_results, report_accumulator, result_schema
from llmql.connectors.spark_udf import make_spec, register
from llmql.connectors.spark_worker import EngineFactory, WorkerContext
from llmql.optimizer.types import LLMCall, LLMPlan
from llmql.udfs.types import CallReport, CallSpec, UDFError

__all__ = ["SparkQueryResult", "register", "run", "run_plan", "sql"]


@dataclass
class SparkQueryResult:
    """The result DataFrame of a query, its plan, and what each LLM call cost."""

    df: Any
    plan: LLMPlan
    calls: dict[str, CallReport] = field(default_factory=dict)

    @property
    def report(self) -> CallReport:
        """All calls' reports merged."""
        total = CallReport()
        for report in self.calls.values():
            total.merge(report)
        return total


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
    **settings: object,
) -> SparkQueryResult:
    """Plan `query` for Spark and run it (see `run_plan`)."""
    from llmql import optimizer

    plan = optimizer.plan(query, dialect="spark")
    return run_plan(spark, plan, engine_factory=engine_factory, partitions=partitions, **settings)


def run_plan(
    spark: Any,
    plan: LLMPlan,
    *,
    engine_factory: EngineFactory | None = None,
    partitions: int | None = None,
    **settings: object,
) -> SparkQueryResult:
    """Run an `LLMPlan` on `spark`.

    Args:
        spark: a SparkSession; the query's tables must be visible to `spark.sql`.
        plan: the optimizer's plan (calls in execution order, then `final_sql`).
        engine_factory: a picklable zero-argument callable returning an Engine for workers;
            None loads the settings' model once per Python worker.
        partitions: partitions per LLM stage (None = Spark's default parallelism).
        **settings: overrides of `llmql.settings.Settings` shipped to the workers.

    Returns:
        SparkQueryResult: the final DataFrame (lazy over materialised LLM results) and a
        `CallReport` per call id.

    Raises:
        UDFError: bad function arguments or options, before any model call.
        pyspark AnalysisException: unknown tables, columns or functions, before any model call.
    """
    workers = spark.sparkContext.defaultParallelism
    ctx = WorkerContext.capture(engine_factory, workers=workers, **settings)
    specs = {call.id: _spec(call) for call in plan.calls}
    check_plan(spark, plan, specs)
    result = SparkQueryResult(df=None, plan=plan)
    for call in plan.calls:
        accumulator = report_accumulator(spark)
        inputs = spark.sql(call.input_sql)
        out = compute_results(
            inputs, specs[call.id], ctx, report=accumulator, partitions=partitions
        )
        out.createOrReplaceTempView(call.result_table)
        result.calls[call.id] = accumulator.value
    result.df = spark.sql(plan.final_sql)
    return result


def check_plan(spark: Any, plan: LLMPlan, specs: dict[str, CallSpec]) -> None:
    """Analyse every stage against empty stand-ins for the result tables (no model call)."""
    for call in plan.calls:
        inputs = spark.sql(call.input_sql)
        missing = [f for f in call.fields if f not in inputs.columns]
        if missing:
            raise UDFError(f"{call.id}: input_sql lacks field(s) {missing}")
        schema = result_schema(inputs.schema, specs[call.id])
        spark.createDataFrame([], schema).createOrReplaceTempView(call.result_table)
    spark.sql(plan.final_sql)


def _spec(call: LLMCall) -> CallSpec:
    if call.function == "llm_agg":
        raise UDFError("llm_agg is not supported by the Spark connector yet")
    return make_spec(call.function, call.instruction, call.fields, dict(call.options))
