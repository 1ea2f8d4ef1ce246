"""The explicitly registered `df.llm` accessor and the Arrow functions (fake engine)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from udfs.fakes import FakeEngine

from llmql.connectors import arrow
from llmql.connectors.pandas import register_accessor
from llmql.settings import override
from llmql.udfs import engines
from llmql.udfs.types import UDFError


@pytest.fixture
def df(monkeypatch, tmp_path):
    fake = FakeEngine(lambda p: '{"n": 2}' if "JSON" in p else ("yes" if "good" in p else "no"))
    monkeypatch.setitem(engines._ENGINES, engines.engine_key("default"), fake)
    register_accessor()
    with override(cache_dir=tmp_path, model="default"):
        yield pd.DataFrame({"t": ["a", "b", "a"], "r": ["good", None, "bad"]}, index=[5, 6, 7])


def test_accessor_is_registered_explicitly_and_idempotently(df):
    register_accessor()
    assert hasattr(df, "llm")


def test_map_filter_score_extract(df):
    mapped = df.llm.map("Say {t}", out="said")
    assert list(mapped.columns) == ["t", "r", "said"] and list(mapped.index) == [5, 6, 7]
    assert df.llm.filter("Nice?", "t", "r").index.tolist() == [5]
    scored = df.llm.score("Rate", 1, 5, "t")
    assert str(scored["score"].dtype) == "Int64"
    extracted = df.llm.extract(
        "Get", {"type": "object", "properties": {"n": {"type": "integer"}}}, "t"
    )
    assert extracted["n"].tolist() == [2, 2, 2]
    assert df.llm.report.rows == 3


def test_agg_by_group(df):
    out = df.llm.agg("Sum up", "r", by="t")
    assert sorted(out["t"]) == ["a", "b"] and out.set_index("t").loc["b", "summary"] is None


def test_column_checks(df):
    with pytest.raises(UDFError, match="not found"):
        df.llm.map("Say", "nope")
    with pytest.raises(UDFError, match="name the input columns"):
        df.llm.map("Say something")


def test_arrow_in_arrow_out(df):
    table = pa.table({"t": ["good", "bad"]})
    assert arrow.llm_filter(table, "Nice {t}?").num_rows == 1
    assert arrow.llm_classify(table, "Tone", ["yes", "no"], "t").column("label").to_pylist() == [
        "yes",
        "no",
    ]
