"""reorder(): always a permutation of rows and of each row's fields; exact on small tables."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from llmql.ordering import reorder
from llmql.ordering.exact import solve_exact
from llmql.ordering.metrics import measure, prefix_metrics, render_prompts
from llmql.ordering.reference_ggr import reference_ggr

values = st.sampled_from(["a", "ab", "abc", "b", "", None, "long value text"])


@st.composite
def tables(draw):
    ncols = draw(st.integers(1, 4))
    nrows = draw(st.integers(0, 25))
    return pa.table({f"f{j}": [draw(values) for _ in range(nrows)] for j in range(ncols)})


@settings(max_examples=60, deadline=None)
@given(tables())
def test_reorder_is_a_permutation(table):
    o = reorder(table)
    assert sorted(o.row_order) == list(range(table.num_rows))
    assert len(o.field_orders) == table.num_rows
    assert all(sorted(f) == sorted(table.column_names) for f in o.field_orders)


@settings(max_examples=40, deadline=None)
@given(tables())
def test_reorder_never_worse_than_reference_on_small_tables(table):
    """On tables of <= CHECKED_ROWS rows ours shares at least as many characters with the
    previous prompt as plain GGR (with and without the exact solver)."""
    if table.num_rows < 2:
        return
    ref = reference_ggr(table)
    assert sorted(ref.row_order) == list(range(table.num_rows))
    for exact_rows in (0, 8):
        assert measure(table, reorder(table, exact_rows=exact_rows)).hits >= measure(table, ref).hits


def test_groups_and_dependencies_travel_together():
    df = pd.DataFrame({"review": ["r1", "r2", "r3", "r4"], "title": ["A", "B", "A", "B"], "code": ["x", "y", "x", "y"]})
    o = reorder(df)
    assert [o.field_orders[0][:2]] == [["title", "code"]]
    assert [df.title[r] for r in o.row_order] in (["A", "A", "B", "B"], ["B", "B", "A", "A"])


def test_exact_solver_optimum():
    import numpy as np
    codes = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    length = np.array([[5, 9], [5, 9], [5, 9], [5, 9]])
    score, segments = solve_exact(codes, length, [0, 1, 2, 3], (0, 1))
    assert score == 18 and sorted(r for rows, _ in segments for r in rows) == [0, 1, 2, 3]


def test_metrics_and_token_level():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    prompts = render_prompts(pa.table({"a": ["x", "x"], "b": ["1", "2"]}), instruction="Do")
    assert prompts[0] == "Do\na: x\nb: 1\n"
    chars, tokens = prefix_metrics(prompts), prefix_metrics(prompts, Chars())
    assert chars.hits == tokens.hits == len("Do\na: x\nb: ")


def _whole_field_hits(codes, length, perm, orders):
    total = 0
    for prev, row, po, o in zip(perm, perm[1:], orders, orders[1:]):
        for a, b in zip(po, o):
            if a != b or codes[prev, a] != codes[row, b]:
                break
            total += int(length[row, b])
    return total


@settings(max_examples=40, deadline=None)
@given(tables())
def test_small_groups_solved_exactly_match_the_exact_solver(table):
    import importlib

    import numpy as np

    from llmql.ordering.encoding import encode

    if not 2 <= table.num_rows <= 6:
        return
    mod = importlib.import_module("llmql.ordering.reorder")
    grouped = mod._GroupedTable.build(encode(table, table.column_names), [[f] for f in table.column_names])
    perm, orders = mod._Levels(grouped, exact_rows=8).run()
    best, _ = solve_exact(grouped.codes, grouped.length, list(range(table.num_rows)), tuple(range(table.num_columns)))
    assert sorted(perm.tolist()) == list(range(table.num_rows))
    assert _whole_field_hits(grouped.codes, grouped.length, perm.tolist(), orders.tolist()) == best
    assert np.all(np.sort(orders, axis=1) == np.arange(table.num_columns))


def test_coarser_determined_field_goes_first():
    # context determines title; splitting on title first also shares it across contexts
    ctx = ["c1 " * 20, "c2 " * 20, "c3 " * 20]
    df = pd.DataFrame({"question": [f"q{i}" for i in range(9)], "context": [ctx[i // 3] for i in range(9)],
                       "title": ["T" if i < 6 else "U" for i in range(9)]})
    o = reorder(df, functional_dependencies=[])
    assert all(f[:2] == ["title", "context"] for f in o.field_orders)
    assert [df.context[r] for r in o.row_order] == sorted(df.context)


def test_rows_with_nothing_repeated_are_sorted_as_text():
    df = pd.DataFrame({"a": ["zeta", "alpha", "beta x", "beta y"], "b": ["1", "2", "3", "4"]})
    o = reorder(df, functional_dependencies=[])
    assert o.field_orders[0] == ["a", "b"]  # sorted neighbours of `a` share "beta "
    assert [df.a[r] for r in o.row_order] == ["alpha", "beta x", "beta y", "zeta"]


@settings(max_examples=40, deadline=None)
@given(tables())
def test_written_order_keeps_fields_and_shares_at_least_the_table_order(table):
    ordering = reorder(table, reorder_fields=False)
    assert sorted(ordering.row_order) == list(range(table.num_rows))
    assert all(order == table.column_names for order in ordering.field_orders)
    prompts = render_prompts(table, ordering)
    assert prompts == sorted(prompts)
    assert measure(table, ordering).hits >= measure(table).hits  # NOTE: sorted text is optimal


def test_written_order_sorts_rows_on_the_first_written_field():
    movies = ["A long shared description of the first movie.", "Another long shared description."]
    table = pa.table({"review": ["b", "a", "c", "d"], "movie": [movies[1], movies[0], movies[0], movies[1]]})
    ordering = reorder(table, ["review", "movie"], reorder_fields=False)
    assert ordering.row_order == [1, 0, 2, 3]
    assert ordering.field_orders == [["review", "movie"]] * 4
    assert reorder(table, ["review", "movie"]).field_orders[0][0] == "movie"  # GGR moves it
