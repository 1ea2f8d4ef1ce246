"""EXPLAIN on DuckDB: measured prefix reuse of the order a call sends, and the field-order hint."""

from __future__ import annotations

import duckdb

from llmql.optimizer.explain import explain

MOVIES = ["A long shared description of the first movie, its plot and its cast.",
          "Another long shared description, of the second movie and its director."]


def _con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE m AS SELECT * FROM (VALUES " + ", ".join(
        f"('review {i}', '{MOVIES[i % 2]}')" for i in range(12)) + ") v(review, info)")
    return con


def test_written_order_is_measured_and_a_field_order_hint_is_given():
    text = explain("SELECT llm('Sum up.', review, info) FROM m", con=_con())
    assert "rows sorted (fields as written)" in text
    assert "hint:" in text and "write info first" in text


def test_no_hint_when_fields_are_reordered_or_already_well_written():
    con = _con()
    reordered = explain("SELECT llm('Sum up.', review, info, reorder_fields := true) FROM m", con=con)
    assert "reordered (rows and fields)" in reordered and "hint:" not in reordered
    assert "hint:" not in explain("SELECT llm('Sum up.', info, review) FROM m", con=con)
