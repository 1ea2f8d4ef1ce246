"""`llmql demo` reads sensibly with the default model: its `llm()` projection answers with
short labels (few-shot examples), not sentence fragments."""

from __future__ import annotations

import re

from llmql.cli import DEMO_QUERIES, EXAMPLES
from llmql.connectors.duckdb import connect


def test_the_demo_projection_answers_with_short_labels():
    (sql,) = [sql for title, sql in DEMO_QUERIES if title == "projection"]
    assert "examples :=" in sql
    with connect(result_cache=False) as con:
        con.execute(f"CREATE VIEW movies AS SELECT * FROM read_csv_auto('{EXAMPLES / 'movies_sample.csv'}')")
        genres = con.sql(sql).df()["genre"].tolist()
    assert len(genres) == 6
    for genre in genres:
        assert isinstance(genre, str) and 1 <= len(genre.split()) <= 3, genres
        assert re.fullmatch(r"[a-z][a-z -]*", genre), genres  # NOTE: no names, no punctuation
