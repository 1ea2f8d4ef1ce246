"""`llmql.spark.sql` against `llmql.connect()` on DuckDB with the same deterministic fake
engine: multi-call plans, classify, score aggregation, llm_agg, extract, NULLs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pyspark")

import conftest_spark
from conftest_spark import FakeEngine, FakeEngineFactory, movies

import llmql
import llmql.spark
from llmql.connectors.spark import stage as spark_stage
from llmql.settings import override
from llmql.spark import functions as L

pytestmark = pytest.mark.spark
spark = conftest_spark.spark  # the shared session fixture

KIDS = "Is this movie suitable for kids?"
SCHEMA = {"type": "object", "properties": {"genre": {"type": "string"}, "year": {"type": "integer"}}}
QUERIES = {
    "filter_then_project": (
        f"SELECT id, llm('Summarise.', movie_title, review_content) AS s FROM movies"
        f" WHERE llm_filter('{KIDS}', movie_info, review_content) ORDER BY id"
    ),
    "classify": (
        "SELECT id, llm_classify('Sentiment?', {labels}, review_content) AS c FROM movies ORDER BY id"
    ),
    "score_avg": (
        "SELECT movie_title, AVG(llm_score('Rate 1 to 5.', 1, 5, review_content)) AS a"
        " FROM movies GROUP BY movie_title ORDER BY movie_title"
    ),
    "agg": (
        "SELECT movie_title, llm_agg('Summarise the reviews.', review_content) AS s"
        " FROM movies GROUP BY movie_title ORDER BY movie_title"
    ),
    "limit": (  # LIMIT reaches the model's inputs: a materialised source
        "SELECT id, llm('Summarise.', movie_title, review_content) AS s FROM movies"
        " WHERE id > 2 ORDER BY id DESC LIMIT 3 OFFSET 1"
    ),
}


@pytest.fixture
def both(spark, tmp_path):
    """Runs a query on DuckDB and on Spark, each with its own fake engine, no result cache."""
    (tmp_path / "duck").mkdir()
    (tmp_path / "spark").mkdir()
    con = llmql.connect(engine=FakeEngine(str(tmp_path / "duck"), 0), result_cache=False)
    con.register("movies", movies(12))
    factory = FakeEngineFactory(str(tmp_path / "spark"))

    def run(query: str) -> tuple[list, list]:
        want = con.sql(query.format(labels="['pos', 'neg']")).fetchall()
        got = llmql.spark.sql(
            spark, query.format(labels="array('pos', 'neg')"), engine_factory=factory,
            result_cache=False,
        ).collect()
        return [tuple(r) for r in got], [tuple(r) for r in want]

    yield run
    con.close()


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_same_results_as_duckdb(both, name):
    got, want = both(QUERIES[name])
    assert got == want and got


@pytest.mark.parametrize("name", ["agg", "filter_then_project"])
def test_shuffled_path_same_results(both, monkeypatch, name):
    # NOTE: inputs larger than the sample are range-partitioned by Spark, not sliced on the driver
    monkeypatch.setattr(spark_stage, "_SAMPLE_ROWS", 4)
    got, want = both(QUERIES[name])
    assert got == want and got


def test_extract_struct_column_and_sql_json(spark, tmp_path):
    llmql.spark.use_engine(FakeEngineFactory(str(tmp_path)))
    # NOTE: a private cache dir: fake answers must never reach the shared result cache
    with override(cache_dir=tmp_path / "cache"):
        df = spark.table("movies").withColumn(
            "facts", L.llm_extract("Extract.", "movie_info", json_schema=SCHEMA)
        )
        llmql.spark.register(spark)
    try:
        row = df.select("facts.genre", "facts.year").first()
        assert (row.genre, row.year) == ("x", 1)
        text = spark.sql(
            f"SELECT llm_extract('Extract.', '{json.dumps(SCHEMA)}', movie_info) AS j FROM movies"
        ).first().j
        assert json.loads(text) == {"genre": "x", "year": 1}
    finally:
        llmql.spark.use_engine(None)



def test_few_shot_examples_same_results_as_duckdb(spark, tmp_path):
    # NOTE: Spark spells the examples array(named_struct(...)), DuckDB a list of structs
    select = "SELECT id, llm_classify('Sentiment?', {labels}, review_content, examples {examples}) AS c"
    duck = select.format(labels="['pos', 'neg']", examples=":= [{'review_content': 'Loved it.', 'answer': 'pos'}]")
    spark_sql = select.format(labels="array('pos', 'neg')", examples="=> array(named_struct("
                              "'review_content', 'Loved it.', 'answer', 'pos'))")
    tail = " FROM movies ORDER BY id"
    con = llmql.connect(engine=FakeEngine(str(tmp_path), 0), result_cache=False)
    con.register("movies", movies(12))
    want = con.sql(duck + tail).fetchall()
    plain = con.sql(QUERIES["classify"].format(labels="['pos', 'neg']")).fetchall()
    con.close()
    got = llmql.spark.sql(spark, spark_sql + tail, engine_factory=FakeEngineFactory(str(tmp_path)),
                          result_cache=False).collect()
    assert [tuple(r) for r in got] == want and want
    assert want != plain  # NOTE: the fake engine's answers hash the prompt: examples reach it
