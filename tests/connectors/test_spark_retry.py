"""A Python worker that dies mid-task is retried without recomputing cached results."""

from __future__ import annotations

import pytest

pytest.importorskip("pyspark")

import conftest_spark
from conftest_spark import FakeEngineFactory, logged

import llmql.spark

pytestmark = pytest.mark.spark
spark = conftest_spark.spark  # the shared session fixture
QUERY = "SELECT id, llm('Summarise the review.', movie_title, review_content) AS s FROM movies40"


def test_retried_task_reuses_finished_results(spark, tmp_path):
    factory = FakeEngineFactory(str(tmp_path), crash_after=8)
    settings = {"cache_dir": tmp_path / "cache", "result_cache": True}
    result = llmql.spark.run(
        spark, QUERY, engine_factory=factory, settings=settings, partitions=1, chunk_size=4
    )
    rows = result.df.collect()
    assert (tmp_path / "crashed").exists()  # the first attempt died after 2 chunks
    # NOTE: an input is its prompt's lines in any order (the field order depends on the batch)
    prompts = [" | ".join(sorted(p.split(" | "))) for p in logged(tmp_path, "prompts")]
    assert len(prompts) == len(set(prompts))  # no finished input computed twice
    answered = [r for r in rows if r.s is not None]
    assert len(answered) == len(set(prompts)) > 8
    assert len(logged(tmp_path, "loads")) == 2  # the crashed worker's engine, then a new one
    report = result.report.total  # NOTE: Spark keeps the successful attempt's counters only
    assert report.cache_hits == 8 and report.llm_calls == len(answered) - 8
