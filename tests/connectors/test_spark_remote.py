"""Spark executors against one `llmql serve` (no model per executor): the same answers as
DuckDB on the embedded engine that the server serves."""

from __future__ import annotations

import pytest

pytest.importorskip("pyspark")
pytest.importorskip("fastapi")

import conftest_spark
from conftest_spark import movies

import llmql
import llmql.spark
from llmql.engine import load
from llmql.engine.server import create_app
from llmql.engine.serving import running

pytestmark = [pytest.mark.spark, pytest.mark.slow]
spark = conftest_spark.spark  # the shared session fixture

FILTER = ("SELECT id FROM movies WHERE llm_filter('Is this movie suitable for kids?',"
          " movie_info, review_content) ORDER BY id")
OPTIONS = {"result_cache": False, "reorder_fields": False}


def test_spark_against_llmql_serve(spark) -> None:
    engine = load()
    with llmql.connect(engine=engine, **OPTIONS) as duck:
        duck.register("movies", movies(12))
        want = [tuple(r) for r in duck.sql(FILTER).fetchall()]
    served = engine.stats().requests
    with running(create_app(engine), host="127.0.0.1") as url:
        got = llmql.spark.sql(spark, FILTER, model=f"{url}/v1", **OPTIONS).collect()
    assert [tuple(r) for r in got] == want
    assert engine.stats().requests > served  # NOTE: the executors asked the server
    engine.close()
