"""phc_upper_bound(): never below the best ordering (brute force on small tables), and tight
enough to be useful on the movies fixture."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from llmql.ordering import reorder
from llmql.ordering.bounds import phc_upper_bound
from llmql.ordering.metrics import measure, prefix_metrics, render_prompt
from llmql.ordering.reference_ggr import reference_ggr

MOVIES = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "movies.csv"
values = st.sampled_from(["a", "ab", "abc", "b", "", None, "a\nb", "long value text", "long value"])


def best_phc(table: pa.Table, instruction: str) -> int:
    """The true optimum: every row order × every per-row field order."""
    fields = table.column_names
    rows = table.to_pylist()
    variants = [
        [render_prompt(instruction, order, [r[f] if r[f] is not None else "null" for f in order])
         for order in itertools.permutations(fields)]
        for r in rows
    ]
    best = 0
    for perm in itertools.permutations(range(len(rows))):
        for choice in itertools.product(*(variants[i] for i in perm)):
            best = max(best, prefix_metrics(list(choice)).hits)
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 2), st.data(), st.sampled_from(["", "Rate it."]))
def test_bound_is_at_least_the_optimum(nrows, ncols, data, instruction):
    table = pa.table({f"f{j}": [data.draw(values) for _ in range(nrows)] for j in range(ncols)})
    bound = phc_upper_bound(table, instruction=instruction)
    assert bound >= best_phc(table, instruction)
    assert bound <= measure(table, instruction=instruction).total


def test_bound_is_tight_for_a_shared_field_then_unique_ones():
    df = pd.DataFrame({"a": ["x", "x"], "b": ["1", "2"]})
    assert phc_upper_bound(df) == best_phc(pa.Table.from_pandas(df, preserve_index=False), "") == 9


def test_bound_on_movies_sits_just_above_ggr():
    df = pd.read_csv(MOVIES)[["movie_title", "movie_info", "review_content"]].drop_duplicates()
    total = measure(df).total
    bound = phc_upper_bound(df)
    ours, ref = measure(df, reorder(df)).hits, measure(df, reference_ggr(df)).hits
    assert ref <= ours <= bound
    assert (bound - ours) / total < 0.02  # the movie text is the shareable part; GGR gets it
