"""End to end with the real engine and the default model (Gemma 3 270M): SQL → plan →
executor → engine → typed results. Small slices keep it fast on CPU."""

from __future__ import annotations

import pytest

import llmql
from llmql.udfs.result_cache import ResultCache

SAMPLE = "examples/movies_sample.csv"


@pytest.fixture(scope="session")
def engine():
    from llmql.engine import load

    return load()


@pytest.fixture
def con(engine, tmp_path, monkeypatch):
    import llmql.udfs.executor as executor

    cache = ResultCache(tmp_path / "results.sqlite")
    monkeypatch.setattr(executor, "default_cache", lambda enabled=None: cache)
    con = llmql.connect(engine=engine, max_tokens=4)
    con.execute(
        "CREATE TABLE movies AS SELECT * FROM read_csv_auto(?) "
        "WHERE movie_title IN ('Shelter', 'Black Water') QUALIFY row_number() "
        "OVER (PARTITION BY movie_title ORDER BY id) <= 3",
        [SAMPLE],
    )
    yield con
    con.close()


def test_filter_projection_and_rerun(con, engine):
    sql = (
        "SELECT movie_title, review_content, llm('Name the genre.', movie_title) AS genre, "
        "llm_score('Rate the review from 1 to 5.', 1, 5, movie_title, review_content) AS s "
        "FROM movies WHERE llm_filter('Is this movie suitable for kids?', movie_title, movie_info)"
    )
    before = engine.stats().requests
    frame = con.sql(sql).df()
    report = con.last_report()
    by_function = {c.function: c.report for c in report.calls}
    assert by_function["llm_filter"].llm_calls == 3  # 2 distinct movies + the "N/A" prompt
    assert set(frame["s"].dropna()) <= {1, 2, 3, 4, 5}
    if len(frame):
        assert frame["genre"].map(lambda g: isinstance(g, str)).all()
    assert report.total.llm_calls == engine.stats().requests - before
    assert report.total.cached_tokens > 0  # prompts sharing a prefix reuse the KV cache

    again = con.sql(sql).df()
    assert again.equals(frame)
    assert con.last_report().total.llm_calls == 0
    assert engine.stats().requests == before + report.total.llm_calls


def test_classify_extract_nulls_and_overflow(con, engine):
    labels = con.sql(
        "SELECT llm_classify('Is the review positive or negative?', ['positive', 'negative'], "
        "review_content) AS l FROM movies"
    ).df()
    assert set(labels["l"].dropna()) <= {"positive", "negative"}
    schema = '{"type": "object", "properties": {"genre": {"type": "string"}}}'
    extracted = con.sql(
        f"SELECT llm_extract('Extract the genre.', '{schema}', movie_title, max_tokens := 12) AS x "
        "FROM (SELECT DISTINCT movie_title FROM movies)"
    ).fetchall()
    failures = con.last_report().total.parse_failures
    assert sum(r[0] is None for r in extracted) == failures
    before = engine.stats().requests
    huge = "word " * 40000
    rows = con.sql(f"SELECT llm('Say', v) FROM (VALUES (NULL), ('{huge}')) t(v)").fetchall()
    assert rows == [(None,), (None,)]
    total = con.last_report().total
    assert total.null_inputs == 1 and total.context_overflows == 1
    assert engine.stats().requests - before <= 1


POSITIVE = ["An absolute masterpiece, I loved every minute.", "Brilliant acting and a wonderful story.",
            "One of the best films I have ever seen.", "Delightful, funny and moving. Highly recommended."]
NEGATIVE = ["A boring, terrible waste of time.", "Awful script and wooden acting. I hated it.",
            "The worst movie of the year, avoid it.", "Dull, painfully slow and badly made."]


def test_calibrated_filter_follows_the_reviews(engine, capsys):
    """Contextual calibration (the default) turns the base model's constant "yes" into answers
    that follow the sentiment; `calibrate=False` shows the degenerate constrained answer."""
    values = ", ".join(f"({i}, '{r}', {i < 4})" for i, r in enumerate(POSITIVE + NEGATIVE))
    sql = ("SELECT positive, llm_filter('Is this review positive?', review) "
           f"FROM (VALUES {values}) t(id, review, positive) ORDER BY id")
    answers, calls = {}, {}
    for calibrate in (True, False):
        con = llmql.connect(engine=engine, result_cache=False, calibrate=calibrate)
        answers[calibrate] = con.sql(sql).fetchall()
        calls[calibrate] = con.last_report().total.llm_calls
        con.close()
    agree = {c: sum(truth == answer for truth, answer in rows) for c, rows in answers.items()}
    with capsys.disabled():
        for c, rows in answers.items():
            print(f"\ncalibrate={c}: agrees {agree[c]}/8, answers {[a for _, a in rows]}", end="")
    assert agree[True] >= 6
    assert calls == {True: 9, False: 8}  # calibrated: + the content-free "N/A" prompt
