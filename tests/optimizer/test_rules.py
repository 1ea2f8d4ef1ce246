"""Fixture-driven rule tests (sqlglot style) and plan execution against DuckDB."""

from __future__ import annotations

import pytest
import sqlglot

from llmql.optimizer import RULES, optimize, plan
from tests.optimizer.helpers import connect, execute_plan, load_fixture, same_rows

RULE_NAMES = [r.__name__ for r in RULES]


@pytest.fixture(scope="module")
def con():
    return connect()


def check_file(name: str, con=None) -> None:
    """Each case: the rules up to `name` turn input into expected; executed cases match rows."""
    rules = RULES[: RULE_NAMES.index(name) + 1]
    for case in load_fixture(name):
        title, sql = case["title"], case["input"]
        got = optimize(sqlglot.parse_one(sql, read="duckdb"), rules=rules)
        expected = sqlglot.parse_one(case["expected"], read="duckdb")
        assert got.sql(dialect="duckdb") == expected.sql(dialect="duckdb"), title
        if case.get("execute") == "true" and con is not None:
            original = con.execute(sql).fetchall()
            assert same_rows(original, execute_plan(con, plan(sql))), title


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rule_fixtures(name, con):
    check_file(name, con)


def test_output_names_are_kept(con):
    sql = "SELECT id, llm('Name', a, b) FROM t"
    execute_plan(con, plan(sql))
    original = [d[0] for d in con.execute(sql).description]
    rewritten = [d[0] for d in con.execute(plan(sql).final_sql).description]
    assert original == rewritten


def test_spark_plan_is_spark_sql():
    p = plan("SELECT a, llm_agg('Sum', b) FROM t WHERE llm_classify('K', array('x', 'y'), a) = 'x' GROUP BY a", "spark")
    assert [c.function for c in p.calls] == ["llm_classify", "llm_agg"]
    assert p.calls[0].options["labels"] == ["x", "y"]
    assert "COLLECT_LIST" in p.calls[1].input_sql and p.calls[1].depends_on == ("llm_0",)
    assert "IS NOT DISTINCT FROM" in p.final_sql or "<=>" in p.final_sql


def test_plan_fields_options_and_order():
    p = plan(
        "SELECT llm('Say', t.a, u.a, x + 1, model := 'm', max_tokens := 8, temperature := 0.5) "
        "FROM t JOIN u ON t.id = u.id WHERE llm_score('R', 1, 5, b) > 3 AND llm_filter('F', b) AND x > 1"
    )
    f, s, p3 = p.calls
    assert (f.function, f.is_filter, f.depends_on) == ("llm_filter", True, ())
    assert (s.function, s.is_filter, s.depends_on, s.options) == ("llm_score", True, ("llm_0",), {"lo": 1, "hi": 5})
    assert p3.fields == ("a", "a_2", "arg3") and p3.depends_on == ("llm_0", "llm_1")
    assert p3.options == {"model": "m", "max_tokens": 8, "temperature": 0.5}
    assert "x > 1" in f.input_sql and f.input_sql.startswith("SELECT DISTINCT")


def test_later_inputs_never_call_an_earlier_filter_again():
    p = plan(
        "SELECT llm('Sum', b) AS s FROM t WHERE x > 1 AND llm_filter('F', a) "
        "AND NOT llm_filter('G', b)"
    )
    assert [c.function for c in p.calls] == ["llm_filter", "llm_filter", "llm"]
    for call in p.calls:
        assert "llm_" not in call.input_sql.lower().replace("llmql_llm_", ""), call.input_sql
    assert "_llmql_llm_0.__llmql_result" in p.calls[2].input_sql


def test_limit_reaches_the_llm_inputs():
    con = connect()
    p = plan("SELECT id, llm('Say', a, b) FROM t WHERE x > 15 ORDER BY id LIMIT 2 OFFSET 1")
    assert len(p.sources) == 1 and "LIMIT 2 OFFSET 1" in p.sources[0].sql
    rows = execute_plan(con, p)
    assert [r[0] for r in rows] == [3, 4]
    assert len(con.sql(p.calls[0].input_sql).fetchall()) == 2  # the model sees two rows, not seven
