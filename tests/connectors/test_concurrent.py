"""Many DuckDB connections in many threads on one process-wide engine (the default model):
every query gets exactly its sequential answers, no NULLs, each query its own tenant."""

from __future__ import annotations

import threading

import pytest

import llmql

SAMPLE = "examples/movies_sample.csv"
QUERIES = [
    "SELECT id, llm('Name the genre in one word.', movie_title) FROM m ORDER BY id",
    "SELECT id, llm_filter('Is the review positive?', review_content) FROM m ORDER BY id",
    "SELECT id, llm_score('Rate the review from 1 to 5.', 1, 5, review_content) FROM m ORDER BY id",
]


@pytest.fixture(scope="module")
def engine():
    from llmql.engine import load

    engine = load(policy="fair")
    yield engine
    engine.close()


def _run(engine, query: str) -> list[tuple]:
    con = llmql.connect(engine=engine, max_tokens=4, result_cache=False)
    con.execute(f"CREATE TABLE m AS SELECT * FROM read_csv_auto('{SAMPLE}') ORDER BY id LIMIT 5")
    try:
        return con.sql(query).fetchall()
    finally:
        con.close()


def test_threads_on_separate_connections_get_sequential_answers(engine) -> None:
    sequential = [_run(engine, q) for q in QUERIES]
    assert all(v is not None for rows in sequential for _, v in rows)
    got: dict[int, list[tuple]] = {}
    barrier = threading.Barrier(len(QUERIES))

    def worker(i: int) -> None:
        barrier.wait()
        got[i] = _run(engine, QUERIES[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUERIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(len(QUERIES))] == sequential
    tenants = engine.scheduler.policy.counters
    assert sum(t.startswith("query-") for t in tenants) >= 2 * len(QUERIES)
    assert engine.kv.available == engine.pool.num_slots  # nothing left locked
