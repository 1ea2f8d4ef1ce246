"""llm_agg's hierarchical reduction, against a fake engine."""

from __future__ import annotations

from udfs.fakes import FakeEngine

from llmql.udfs import CallOptions, CallSpec
from llmql.udfs.aggregate import run_agg


def test_small_groups_take_one_call_each():
    engine = FakeEngine(lambda p: f"summary of {p.count('review:')}")
    spec = CallSpec("llm_agg", "Summarise", ("review",))
    out = run_agg(spec, [["a", "b"], [None], ["c"]], engine=engine, cache=None)
    assert out.values.to_pylist() == ["summary of 2", None, "summary of 1"]
    assert len(engine.prompts) == 2 and out.report.null_inputs == 1


def test_large_group_reduces_in_levels():
    engine = FakeEngine(lambda p: "s" * 20)
    spec = CallSpec("llm_agg", "Summarise", ("review",), CallOptions(context_tokens=20))
    values = [f"review number {i} " * 3 for i in range(12)]
    out = run_agg(spec, [values], engine=engine, cache=None)
    assert out.values.to_pylist() == ["s" * 20]
    assert len(engine.prompts) > 6  # level 0 splits, later levels merge summaries
    assert any("summary: " in p for p in engine.prompts)
