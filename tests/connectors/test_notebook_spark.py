"""`%%llmql --spark` in a real IPython InteractiveShell on the shared local Spark session
(a deterministic picklable engine on the workers: this tests the plumbing, not answers)."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("pyspark")
import conftest_spark
from conftest_spark import FakeEngineFactory
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

pytestmark = pytest.mark.spark
spark = conftest_spark.spark  # the shared session fixture


@pytest.fixture
def shell(spark, tmp_path):
    import llmql.spark

    llmql.spark.use_engine(FakeEngineFactory(str(tmp_path)))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llmql")
    shell.user_ns["spark"] = spark
    yield shell
    llmql.spark.use_engine(None)
    for name in ("spark", "out", "reviews", "v"):
        shell.user_ns.pop(name, None)


def test_spark_cell_with_parameter_and_namespace_frame(shell, spark):
    value = "x'); DROP VIEW movies; --"
    shell.user_ns["v"] = value
    shell.user_ns["reviews"] = pd.DataFrame({"title": ["a", "b", "a"], "stars": [1, 5, 4]})
    cell = (
        "%%llmql --spark -o out\n"
        "SELECT title, {v} AS v, llm_filter('Is it good?', title) AS good FROM reviews "
        "WHERE stars > 1 ORDER BY stars"
    )
    with capture_output() as captured:
        result = shell.run_cell(cell)
    assert result.success, captured.stdout
    out = shell.user_ns["out"]
    assert out["title"].tolist() == ["a", "b"] and out["v"].tolist() == [value] * 2
    assert out["good"].isin([True, False]).all()
    assert out.attrs["llmql_report"].calls[0].report.rows == 2
    assert "prefix_hit" in captured.outputs[1].data["text/plain"]
    assert "reviews" not in {t.name for t in spark.catalog.listTables()}
    assert spark.table("movies").count() == 12


def test_spark_explain_and_bad_query(shell):
    with capture_output() as captured:
        result = shell.run_cell(
            "%llmql --spark explain SELECT llm_filter('Kids?', movie_info) FROM movies"
        )
    assert result.success, captured.stdout
    assert "llm_0: llm_filter('Kids?')" in captured.outputs[0].data["text/plain"]
    with capture_output() as captured:
        result = shell.run_cell("%llmql --spark SELECT * FROM no_such_view")
    assert not result.success
    lines = [ln for ln in captured.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmql: "), captured.stdout
