"""Bad input: clear errors before any model call, never a silent wrong answer."""

from __future__ import annotations

import pytest

from llmql.optimizer import PlanError, SQLParseError, UnknownColumnError, UnsupportedError, plan
from llmql.optimizer.planner import schema_from_duckdb
from tests.optimizer.helpers import connect


def test_parse_error_has_position():
    with pytest.raises(SQLParseError, match="line 2, col") as info:
        plan("SELECT a\nFROM WHERE llm('x', a)")
    assert info.value.line == 2 and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT llm(b, a) FROM t", "instruction must be a string literal"),
        ("SELECT llm('x') FROM t", "at least one column"),
        ("SELECT llm_classify('x', a, b) FROM t", "labels must be a list"),
        ("SELECT llm_extract('x', '{bad', a) FROM t", "not valid JSON"),
        ("SELECT llm('x', a, colour := 'red') FROM t", "unknown option"),
        ("SELECT llm_agg('x', a, b) FROM t", "llm_agg takes"),
        ("SELECT 1; SELECT 2", "one SQL statement"),
    ],
)
def test_invalid_calls(sql, message):
    with pytest.raises(PlanError, match=message):
        plan(sql)


@pytest.mark.parametrize(
    ("sql", "construct"),
    [
        ("SELECT SUM(llm_score('R', 1, 5, a)) OVER (PARTITION BY b) FROM t", "window function"),
        ("SELECT * FROM t JOIN u ON llm_filter('Same?', t.a, u.c)", "JOIN condition"),
        ("SELECT id FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id AND llm_filter('x', u.c))", "correlated subquery"),
        ("SELECT a FROM t UNION SELECT c FROM u ORDER BY llm('x', a)", "outside a SELECT"),
        ("SELECT a, COUNT(*) FROM t GROUP BY ROLLUP (a) HAVING llm_filter('x', a)", "GROUPING SETS/ROLLUP/CUBE"),
        ("SELECT COUNT(*), llm('x', 'k') FROM t", "global aggregate"),
        ("SELECT * FROM t JOIN u USING (id) WHERE llm_filter('x', a)", "USING/NATURAL"),
        ("SELECT id FROM t WHERE llm_agg('x', a) > 1", "cannot appear in WHERE"),
        ("SELECT llm('x', llm_agg('y', a)) FROM t", "over llm_agg"),
        ("INSERT INTO t SELECT llm('x', a) FROM t", "only queries"),
    ],
)
def test_unsupported_constructs_are_named(sql, construct):
    with pytest.raises(UnsupportedError, match=construct):
        plan(sql)


def test_unknown_column_with_schema():
    schema = schema_from_duckdb(connect())
    with pytest.raises(UnknownColumnError, match="nope"):
        plan("SELECT llm('x', nope) FROM t", schema=schema)
    assert plan("SELECT llm('x', a) FROM t", schema=schema).calls
