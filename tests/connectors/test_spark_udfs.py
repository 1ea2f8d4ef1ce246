"""Spark plumbing with a deterministic fake engine: SQL UDFs, column functions, transforms,
plans, NULLs, errors and per-worker engine reuse."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

import conftest_spark
from conftest_spark import FakeEngine, FakeEngineFactory, logged

import llmql.spark
from llmql.optimizer.types import LLMCall, LLMPlan
from llmql.settings import override
from llmql.spark import functions as L
from llmql.udfs import CallOptions, CallSpec, UDFError
from llmql.udfs.executor import run_call

pytestmark = pytest.mark.spark
spark = conftest_spark.spark  # the shared session fixture
FIELDS = ("movie_info", "review_content")
# NOTE: the first 12 movies rows: 3 NULL reviews, 9 distinct non-NULL (info, review) pairs.
DISTINCT = 9


@pytest.fixture
def fake(tmp_path: Path, spark):
    logs = tmp_path / "logs"
    logs.mkdir()
    factory = FakeEngineFactory(str(logs))
    llmql.spark.use_engine(factory)
    with override(cache_dir=tmp_path / "cache"):
        yield logs
    llmql.spark.use_engine(None)


def expected(function: str, fields: tuple[str, ...], table: pa.Table, tmp: Path, **options):
    spec = CallSpec(function, "Is this movie suitable for kids?", fields, CallOptions(**options))
    (tmp / "local").mkdir(exist_ok=True)
    return run_call(spec, table, engine=FakeEngine(str(tmp / "local"), 0), cache=None).values


def test_sql_udf_matches_executor_and_nulls(spark, fake, tmp_path):
    registration = llmql.spark.register(spark)
    rows = spark.sql(
        "SELECT id, llm_filter('Is this movie suitable for kids?', movie_info, review_content) AS k"
        " FROM movies ORDER BY id"
    ).toArrow()
    table = spark.sql("SELECT movie_info AS input1, review_content AS input2 FROM movies ORDER BY id")
    want = expected("llm_filter", ("input1", "input2"), table.toArrow(), tmp_path)
    assert rows.column("k").to_pylist() == want.to_pylist()
    assert None in want.to_pylist()  # the NULL review gives NULL
    prompts = logged(fake, "prompts")
    assert len(prompts) == len(set(prompts)) == DISTINCT  # NULL inputs: no model call
    report = registration.last_report()
    # NOTE: ORDER BY samples its input first, so Spark may evaluate the UDF twice (cache hits)
    assert report.llm_calls == DISTINCT and report.rows in (12, 24)


def test_sql_udf_struct_fields_labels_and_agg(spark, fake):
    llmql.spark.register(spark)
    rows = spark.sql(
        "SELECT llm_classify('Genre?', array('drama', 'comedy'), named_struct('info', movie_info))"
        " AS g FROM movies"
    ).collect()
    assert {r.g for r in rows} <= {"drama", "comedy"}
    assert all(line.startswith("Genre? | info: ") for line in logged(fake, "prompts"))
    sums = spark.sql(
        "SELECT movie_title, llm_agg('Summarise.', review_content) AS s FROM movies GROUP BY 1"
    ).collect()
    assert len(sums) == 11 and all(r.s is None or r.s.startswith("answer") for r in sums)


def test_column_functions_use_column_names(spark, fake, tmp_path):
    df = spark.table("movies").orderBy("id")
    out = df.withColumn("kids", L.llm_filter("Is this movie suitable for kids?", *FIELDS))
    out = out.withColumn("stars", L.llm_score("Is this movie suitable for kids?", "movie_info"))
    got = out.select("kids", "stars").toArrow()
    table = df.toArrow()
    assert got.column("kids").to_pylist() == expected("llm_filter", FIELDS, table, tmp_path).to_pylist()
    stars = expected("llm_score", ("movie_info",), table, tmp_path, lo=1, hi=5)
    assert got.column("stars").to_pylist() == stars.to_pylist()


def test_transform_helpers_dedup_across_partitions(spark, fake):
    df = spark.table("movies").repartition(3)
    kept = df.transform(L.where_llm("Is this movie suitable for kids?", *FIELDS))
    marked = df.transform(L.with_llm("kids", "llm_filter", "Is this movie suitable for kids?", *FIELDS))
    assert marked.columns == [*df.columns, "kids"] and kept.columns == df.columns
    want = sorted(r.id for r in marked.collect() if r.kids)
    assert sorted(r.id for r in kept.collect()) == want
    prompts = logged(fake, "prompts")
    assert len(prompts) == len(set(prompts)) == DISTINCT  # the second transform hit the result cache


def test_sql_runs_the_plan_and_reports(spark, fake):
    result = llmql.spark.run(
        spark,
        "SELECT id FROM movies WHERE llm_filter('Is this movie suitable for kids?',"
        " movie_info, review_content)",
    )
    ids = sorted(r.id for r in result.df.collect())
    assert ids and len(ids) < 12
    report = result.report.total
    assert (report.rows, report.null_inputs, report.llm_calls) == (12, 3, DISTINCT)
    agg = llmql.spark.sql(
        spark, "SELECT movie_title, llm_agg('Summarise.', review_content) AS s FROM movies GROUP BY 1"
    ).collect()
    assert len(agg) == 11
    assert llmql.spark.sql(spark, "SELECT count(*) AS n FROM movies").first().n == 12


def test_errors_before_any_model_call(spark, fake):
    with pytest.raises(UDFError, match="unknown option"):
        L.llm("Summarise.", "movie_info", max_tokenz=3)
    with pytest.raises(UDFError, match="labels"):
        L.llm_classify("Genre?", "movie_info", labels=[])
    with pytest.raises(UDFError, match="not a row LLM function"):
        L.with_llm("x", "llm_summarize", "Hi", "movie_info")
    with pytest.raises(Exception, match="nope"):
        llmql.spark.sql(spark, "SELECT llm('Hi', nope) FROM movies")
    with pytest.raises(Exception, match=r"(?i)llm_summarize"):
        llmql.spark.sql(spark, "SELECT llm('Hi', movie_info), llm_summarize(1) FROM movies")
    bad = LLMCall("llm_0", "llm", "Hi", ("nope",), "SELECT DISTINCT nope FROM movies", "__llm_0")
    plan = LLMPlan("-", "spark", (bad,), "SELECT * FROM __llm_0")
    with pytest.raises(Exception, match="nope"):
        llmql.spark.run_plan(spark, plan)
    assert logged(fake, "prompts") == []


def test_each_worker_loads_its_engine_once(spark, fake):
    llmql.spark.register(spark)
    for instruction in ("One?", "Two?", "Three?"):
        spark.sql(f"SELECT llm_filter('{instruction}', movie_info) FROM movies").collect()
    loads = logged(fake, "loads")
    assert 1 <= len(loads) <= 2  # local[2]: at most one engine per Python worker
