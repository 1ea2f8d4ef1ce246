"""DuckDB connector logic with a deterministic fake engine (the model path: test_duckdb_model)."""

from __future__ import annotations

import duckdb
import pytest
from udfs.fakes import FakeEngine

import llmql
from llmql.udfs.types import UDFError


def _answer(prompt: str) -> str:
    if "Answer (yes or no):" in prompt:
        return "yes" if "good" in prompt else "no"
    if "JSON" in prompt:
        return '{"n": 7}'
    return prompt.splitlines()[-2].split(": ", 1)[1].upper()


@pytest.fixture
def con():
    engine = FakeEngine(_answer)
    con = llmql.connect(engine=engine, result_cache=False)
    con.execute(
        "CREATE TABLE t AS SELECT * FROM (VALUES ('m1', 'good'), ('m2', 'bad'), ('m1', 'good'),"
        " ('m3', NULL)) v(title, review)"
    )
    con.engine_fake = engine
    yield con
    con.close()


def test_projection_dedups_and_keeps_nulls(con):
    rows = con.sql("SELECT title, llm('Say', title, review) AS s FROM t ORDER BY ALL").fetchall()
    assert rows == [("m1", "GOOD"), ("m1", "GOOD"), ("m2", "BAD"), ("m3", None)]
    report = con.last_report().total
    assert report.llm_calls == 2 and report.null_inputs == 1


def test_filter_classify_score_extract(con):
    kept = con.sql("SELECT DISTINCT title FROM t WHERE llm_filter('Nice?', title, review)")
    assert kept.fetchall() == [("m1",)]
    labels = con.sql("SELECT llm_classify('Tone', ['GOOD', 'BAD'], review) AS l FROM t").df()
    assert set(labels["l"].dropna()) == {"GOOD", "BAD"}
    scores = con.sql("SELECT llm_score('Rate', 1, 5, review, max_tokens := 2) FROM t").fetchall()
    assert all(v[0] is None or 1 <= v[0] <= 5 for v in scores)
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}}'
    got = con.sql(f"SELECT llm_extract('Get', '{schema}', review).n AS n FROM t").fetchall()
    assert {r[0] for r in got} == {7, None}


def test_aggregate(con):
    rows = con.sql("SELECT title, llm_agg('Sum up', review) FROM t GROUP BY title ORDER BY 1")
    assert rows.fetchall() == [("m1", "GOOD"), ("m2", "BAD"), ("m3", None)]


def test_rerun_makes_no_model_calls(tmp_path):
    engine = FakeEngine(_answer)
    from llmql.settings import override

    with override(cache_dir=tmp_path), llmql.connect(engine=engine) as con:
        con.execute("CREATE TABLE t AS SELECT 'x' || i AS v FROM range(5) r(i)")
        first = con.sql("SELECT v, llm('Say', v) FROM t ORDER BY v").fetchall()
        calls = len(engine.prompts)
        assert con.sql("SELECT v, llm('Say', v) FROM t ORDER BY v").fetchall() == first
        assert len(engine.prompts) == calls == 5
        assert con.last_report().total.cache_hits == 5


def test_non_llm_sql_passes_through(con):
    assert con.sql("SELECT count(*) FROM t").fetchall() == [(4,)]
    assert con.execute("SELECT 1").fetchall() == [(1,)]
    assert con.last_report().calls == []


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("SELECT llm(review, title) FROM t", ValueError),  # non-constant instruction
        ("SELECT llm('Say', title, bogus := 3) FROM t", ValueError),  # unknown option
        ("SELECT llm_score('Rate', 'a', 5, title) FROM t", ValueError),  # wrong argument type
        ("SELECT llm_nope('Say', title) FROM t", duckdb.Error),  # unknown function
        ("SELECT llm('Say', nope) FROM t", (ValueError, duckdb.Error)),  # unknown column
    ],
)
def test_bad_input_fails_before_model_calls(con, sql, error):
    with pytest.raises(error):
        con.sql(sql).fetchall()
    assert con.engine_fake.prompts == []


def test_register_on_a_plain_connection():
    engine = FakeEngine(_answer)
    raw = duckdb.connect()
    reg = llmql.register(raw, engine=engine, result_cache=False)
    rows = raw.sql("SELECT llm('Say', {'name': v}) FROM (VALUES ('a'), ('b'), ('a')) t(v)")
    assert rows.fetchall() == [("A",), ("B",), ("A",)]
    assert engine.prompts[0] == "Say\nname: a\nAnswer:"
    assert reg.last_report().llm_calls == 2
    assert raw.sql("SELECT llm_agg('Sum', v) FROM (VALUES ('a'), ('b')) t(v)").fetchall()
    with pytest.raises(duckdb.Error, match="constant"):
        raw.sql("SELECT llm(v, v) FROM (VALUES ('a'), ('b')) t(v)").fetchall()
    with pytest.raises(UDFError):
        llmql.register(raw, max_tokenz=3)
    raw.close()


def test_limit_answers_only_the_limited_rows():
    engine = FakeEngine(_answer)
    with llmql.connect(engine=engine, result_cache=False) as con:
        con.execute("CREATE TABLE big AS SELECT i, 'v' || i AS v FROM range(50) r(i)")
        rows = con.sql("SELECT i, llm('Say', v) AS s FROM big ORDER BY i DESC LIMIT 3").fetchall()
        assert rows == [(49, "V49"), (48, "V48"), (47, "V47")]
        assert len(engine.prompts) == 3 and con.last_report().total.llm_calls == 3
        # without ORDER BY, the rows the model answered are the rows returned
        rows = con.sql("SELECT i, llm('Say', v) AS s FROM big LIMIT 4").fetchall()
        assert len(rows) == 4 and all(s == f"V{i}" for i, s in rows)
        assert len(engine.prompts) == 7


def test_parameters_reach_the_llm_inputs(con):
    rows = con.execute(
        "SELECT title, llm('Say?', review) AS s FROM t WHERE review = ? ORDER BY title LIMIT ?", ["good", 5]
    ).fetchall()
    assert rows == [("m1", "GOOD"), ("m1", "GOOD")]
    assert con.last_report().total.llm_calls == 1
    named = con.execute("SELECT llm('Say', review) FROM t WHERE title = $t", {"t": "m2"}).fetchall()
    assert named == [("BAD",)]
    from llmql.optimizer import PlanError

    with pytest.raises(PlanError, match="fewer parameters"):
        con.execute("SELECT llm('Say', review) FROM t WHERE title = ? AND review = ?", ["m1"])
    with pytest.raises(PlanError, match="2 parameters for 1"):
        con.execute("SELECT llm('Say', review) FROM t WHERE title = ?", ["m1", "x"])
