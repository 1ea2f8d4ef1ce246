"""Few-shot examples: rendered once before the row in the written field order, part of the
cache key, checked before any model call; SQL (DuckDB) and Python take the same shape."""

from __future__ import annotations

import pytest

from llmql.optimizer import plan
from llmql.optimizer.errors import PlanError
from llmql.udfs import CallOptions, CallSpec, UDFError
from llmql.udfs.run import run_spec
from tests.udfs.fakes import FakeEngine

WINE = [
    {"Varietal": "Riesling", "Description": "Crisp apple and lime.", "answer": "fruity"},
    {"Description": "Leather and tobacco.", "Varietal": "Syrah", "answer": "earthy"},
]


def _spec(function="llm", examples=WINE, **options):
    return CallSpec(function, "Name the style.", ("Varietal", "Description"),
                    CallOptions(examples=examples, **options))


def test_examples_come_after_the_instruction_in_written_order_before_the_row():
    spec = _spec()
    row = {"Varietal": "Merlot", "Description": "Plum."}
    assert spec.render(row, ["Description", "Varietal"]) == (
        "Name the style.\n"
        "Varietal: Riesling\nDescription: Crisp apple and lime.\nAnswer: fruity\n\n"
        "Varietal: Syrah\nDescription: Leather and tobacco.\nAnswer: earthy\n\n"
        "Description: Plum.\nVarietal: Merlot\nAnswer:"
    )
    # NOTE: the per-row field order never reaches the examples: the prefix stays shared
    written = spec.render(row, ["Varietal", "Description"])
    prefix = written[: written.index("Varietal: Merlot")]
    assert spec.render(row, ["Description", "Varietal"]).startswith(prefix)
    assert prefix.endswith("Answer: earthy\n\n")
    assert prefix == spec.shared_prefix() + "\n"  # NOTE: what explain's prefix metrics measure


def test_examples_are_part_of_the_cache_key():
    plain = CallSpec("llm", "Name the style.", ("Varietal", "Description")).signature()
    assert "examples" not in plain
    assert _spec().signature() != plain
    assert _spec().signature() != _spec(examples=WINE[:1]).signature()
    assert _spec().signature() == _spec(examples=[dict(e) for e in WINE]).signature()


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ("fruity", "must be a list"),
        ({"answer": "x"}, "must be a list"),
        (["fruity"], "must be a struct"),
        ([{"Varietal": "Riesling", "Description": "Crisp."}], "has no 'answer'"),
    ],
)
def test_malformed_examples_fail_when_the_options_are_built(examples, message):
    with pytest.raises(UDFError, match=message):
        CallOptions(examples=examples)


def test_a_wrong_or_missing_field_fails_before_any_model_call():
    engine = FakeEngine()
    bad = [{"Grape": "Riesling", "Description": "Crisp.", "answer": "fruity"}]
    with pytest.raises(UDFError, match=r"unknown \['Grape'\], missing \['Varietal'\]"):
        run_spec(_spec(examples=bad), _table(), engine=engine)
    assert engine.prompts == []


def test_an_answer_must_be_one_of_the_choices():
    with pytest.raises(UDFError, match="not one of"):
        _spec("llm_classify", labels=("fruity", "earthy"),
              examples=[{**WINE[0], "answer": "sweet"}]).validate()
    with pytest.raises(UDFError, match="not one of"):
        _spec("llm_score", lo=1, hi=5, examples=[{**WINE[0], "answer": 7}]).validate()
    with pytest.raises(UDFError, match="not one of"):
        _spec("llm_filter", examples=[{**WINE[0], "answer": "maybe"}]).validate()
    spec = _spec("llm_filter", examples=[{**WINE[0], "answer": True}, {**WINE[1], "answer": "No"}])
    spec.validate()
    assert "Answer (yes or no): yes\n" in spec.render(WINE[0])
    assert "Answer (yes or no): no\n" in spec.render(WINE[0])
    _spec("llm_score", lo=1, hi=5, examples=[{**WINE[0], "answer": 4}]).validate()


def test_sql_examples_reach_the_call_spec():
    sql = ("SELECT llm_classify('Style?', ['fruity', 'earthy'], Varietal, Description, "
           "examples := [{'Varietal': 'Riesling', 'Description': 'Crisp.', 'answer': 'fruity'}]) "
           "FROM wines")
    spec = plan(sql, dialect="duckdb").calls[0].spec()
    assert spec.options.examples == ({"Varietal": "Riesling", "Description": "Crisp.", "answer": "fruity"},)
    spark = plan("SELECT llm('Style?', Varietal, examples => array(named_struct('Varietal', 'Syrah', "
                 "'answer', 'earthy'))) FROM wines", dialect="spark").calls[0].spec()
    assert spark.options.examples == ({"Varietal": "Syrah", "answer": "earthy"},)
    with pytest.raises(PlanError, match="list of struct literals"):
        plan("SELECT llm('Style?', Varietal, examples := 'fruity') FROM wines", dialect="duckdb")


def test_duckdb_end_to_end_sends_the_examples_once_per_prompt():
    from llmql.connectors.duckdb import connect

    engine = FakeEngine(answer=lambda prompt: "earthy" if "Syrah" in prompt.rsplit("\n\n", 1)[-1] else "fruity")
    con = connect(engine=engine, result_cache=False)
    con.execute("CREATE TABLE wines AS SELECT * FROM (VALUES ('Syrah', 'Smoke.'), ('Gamay', 'Cherry.')) "
                "t(Varietal, Description)")
    rows = con.sql(
        "SELECT Varietal, llm('Name the style.', Varietal, Description, examples := "
        "[{'Varietal': 'Riesling', 'Description': 'Crisp apple and lime.', 'answer': 'fruity'}]) AS style "
        "FROM wines ORDER BY Varietal"
    ).fetchall()
    assert rows == [("Gamay", "fruity"), ("Syrah", "earthy")]
    assert all(p.count("Answer: fruity") == 1 and p.startswith("Name the style.\nVarietal: Riesling")
               for p in engine.prompts)


def _table():
    import pyarrow as pa

    return pa.table({"Varietal": ["Merlot"], "Description": ["Plum."]})


def test_pandas_takes_the_same_examples():
    import pandas as pd

    from llmql.connectors.pandas import register_accessor

    register_accessor()
    engine = FakeEngine(answer=lambda prompt: "earthy")
    df = pd.DataFrame({"Varietal": ["Syrah"], "Description": ["Smoke."]})
    out = df.llm.classify("Style?", ["fruity", "earthy"], "Varietal", "Description",
                          examples=WINE, engine=engine, result_cache=False)
    assert out.iloc[0, -1] == "earthy"
    assert engine.prompts[0].count("Answer with one of fruity, earthy: fruity\n") == 1
    with pytest.raises(UDFError, match="missing"):
        df.llm.map("Style?", "Varietal", examples=WINE, engine=engine)
