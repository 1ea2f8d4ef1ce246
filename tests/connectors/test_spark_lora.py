"""LoRA adapters through Spark (`adapter :=` in SQL, `adapter=` on column functions): each
call's adapter reaches the engine on the workers, and calls that differ only by adapter
are neither merged nor served from each other's cache entries."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pyspark")

import conftest_spark
from conftest_spark import FakeEngineFactory

import llmql.spark
from llmql.settings import override
from llmql.spark import functions as L

pytestmark = pytest.mark.spark
spark = conftest_spark.spark  # the shared session fixture


@pytest.fixture
def fake(tmp_path: Path, spark):
    logs = tmp_path / "logs"
    logs.mkdir()
    llmql.spark.use_engine(FakeEngineFactory(str(logs)))
    with override(cache_dir=tmp_path / "cache"):
        yield logs
    llmql.spark.use_engine(None)


def test_column_function_adapter(spark, fake) -> None:
    frame = spark.table("movies").select(
        "id", L.llm("Summarise.", "review_content", adapter="a2").alias("c"),
        L.llm("Summarise.", "review_content").alias("d"))
    rows = [r for r in frame.collect() if r.d is not None]
    assert rows and all(r.c == f"{r.d} via a2" for r in rows)


def test_sql_adapter_per_call(spark, fake) -> None:
    query = ("SELECT id, llm('Summarise.', review_content, adapter := 'a1') AS a,"
             " llm('Summarise.', review_content) AS b FROM movies ORDER BY id")
    rows = llmql.spark.sql(spark, query).collect()
    pairs = [(r.a, r.b) for r in rows if r.b is not None]
    assert pairs and all(a == f"{b} via a1" for a, b in pairs)  # NOTE: same prompt, own adapter
    again = llmql.spark.sql(spark, query).collect()  # NOTE: from the result cache, by adapter
    assert [(r.a, r.b) for r in again] == [(r.a, r.b) for r in rows]
