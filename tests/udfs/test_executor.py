"""The batch executor's pure logic, against a deterministic fake engine (no model)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from udfs.fakes import FakeEngine

from llmql.udfs.executor import CallOptions, CallSpec, run_call
from llmql.udfs.result_cache import ResultCache
from llmql.udfs.types import OutputParseError, UDFError

TABLE = pa.table({"title": ["a", "b", "a", None, "c"], "review": ["x", "y", "x", "z", "w"]})


@pytest.fixture
def cache(tmp_path):
    return ResultCache(tmp_path / "results.sqlite")


def test_dedup_nulls_and_alignment(cache):
    engine = FakeEngine()
    out = run_call(CallSpec("llm", "Say", ("title", "review")), TABLE, engine=engine, cache=cache)
    assert out.values.to_pylist() == ["A", "B", "A", None, "C"]
    assert out.report.null_inputs == 1 and out.report.distinct_inputs == 3
    assert out.report.llm_calls == 3 == len(engine.prompts)


def test_prompt_format():
    engine = FakeEngine(lambda p: "yes")
    run_call(
        CallSpec("llm_filter", "Kids?", ("title", "review")),
        TABLE.slice(0, 1),
        engine=engine,
        cache=None,
    )
    assert engine.prompts == ["Kids?\ntitle: a\nreview: x\nAnswer (yes or no):"]


def test_rerun_hits_cache_whatever_the_field_order(cache):
    run_call(CallSpec("llm", "Say", ("title", "review")), TABLE, engine=FakeEngine(), cache=cache)
    again = FakeEngine()
    out = run_call(CallSpec("llm", "Say", ("review", "title")), TABLE, engine=again, cache=cache)
    assert again.prompts == [] and out.report.llm_calls == 0 and out.report.cache_hits == 3
    other = FakeEngine()
    run_call(CallSpec("llm", "Say it", ("title", "review")), TABLE, engine=other, cache=cache)
    assert len(other.prompts) == 3  # a different instruction is a different key


def test_an_explicit_engine_keys_results_by_its_own_model(cache):
    first = FakeEngine()
    first.model_name = "/models/a.gguf"
    run_call(CallSpec("llm", "Say", ("title", "review")), TABLE, engine=first, cache=cache)
    second = FakeEngine(lambda p: "other")
    second.model_name = "/models/b.gguf"
    out = run_call(CallSpec("llm", "Say", ("title", "review")), TABLE, engine=second, cache=cache)
    assert out.report.cache_hits == 0 and len(second.prompts) == 3
    assert out.values.to_pylist() == ["other", "other", "other", None, "other"]


def test_answers_are_cached_as_they_finish_and_ctrl_c_keeps_them(cache):
    table = pa.table({"t": [str(i) for i in range(10)]})
    engine = FakeEngine()
    original = engine.generate

    def generate(requests, *, progress=False):
        if engine.submitted > 7:
            raise KeyboardInterrupt
        return original(requests, progress=progress)

    engine.generate = generate
    spec = CallSpec("llm", "Say", ("t",), CallOptions(chunk_size=4))
    with pytest.raises(KeyboardInterrupt):
        run_call(spec, table, engine=engine, cache=cache)
    assert len(cache) == 4  # the first window's answers; the second's were in flight
    engine.generate = original
    out = run_call(spec, table, engine=engine, cache=cache)
    assert out.report.cache_hits == 4 and len(cache) == 10


def test_unparseable_answers_are_null_and_counted(cache):
    spec = CallSpec("llm_score", "Rate", ("t",), CallOptions(lo=1, hi=5))
    engine = FakeEngine(lambda p: "great")
    engine.generate = _unconstrained(engine)
    out = run_call(spec, pa.table({"t": ["q"]}), engine=engine, cache=cache)
    assert out.values.to_pylist() == [None] and out.report.parse_failures == 1
    raising = CallSpec("llm_score", "Rate", ("t",), CallOptions(lo=1, hi=5, on_error="raise"))
    with pytest.raises(OutputParseError):
        run_call(raising, pa.table({"t": ["q"]}), engine=engine, cache=cache)


def test_context_overflow_and_engine_errors_are_null(cache):
    engine = FakeEngine(overflow_on=("huge",), fail_on=("bad",))
    table = pa.table({"t": ["huge", "bad", "ok"]})
    out = run_call(CallSpec("llm", "Say", ("t",)), table, engine=engine, cache=cache)
    assert out.values.to_pylist() == [None, None, "OK"]
    assert out.report.context_overflows == 1 and out.report.errors == 1
    assert len(cache) == 1  # failures are not cached


def test_engine_exception_fails_only_the_bad_prompt(cache):
    engine = FakeEngine()
    original = engine.generate

    def generate(requests, *, progress=False):
        if any("boom" in r.prompt for r in requests):
            raise RuntimeError("prompt too long for the context")
        return original(requests, progress=progress)

    engine.generate = generate
    out = run_call(
        CallSpec("llm", "Say", ("t",)),
        pa.table({"t": ["boom", "fine"]}),
        engine=engine,
        cache=cache,
    )
    # NOTE: an exception is an internal error whatever its words say
    assert out.values.to_pylist() == [None, "FINE"] and out.report.errors == 1
    assert out.report.context_overflows == 0


@pytest.mark.parametrize(
    ("function", "options", "message"),
    [
        ("llm_nope", {}, "unknown LLM function"),
        ("llm_classify", {}, "labels"),
        ("llm_score", {"lo": 5, "hi": 1}, "lo <= hi"),
        ("llm_extract", {"json_schema": {"type": "array"}}, "object"),
    ],
)
def test_bad_calls_fail_before_any_model_call(function, options, message):
    engine = FakeEngine()
    with pytest.raises(UDFError, match=message):
        spec = CallSpec(function, "Do", ("title",), CallOptions.from_dict(options))
        run_call(spec, TABLE, engine=engine, cache=None)
    assert engine.prompts == []


def test_unknown_option_and_missing_column():
    with pytest.raises(UDFError, match="unknown option"):
        CallOptions.from_dict({"max_tokenz": 3})
    with pytest.raises(UDFError, match="not found"):
        run_call(CallSpec("llm", "Do", ("nope",)), TABLE, engine=FakeEngine(), cache=None)
    with pytest.raises(UDFError, match="instruction"):
        CallSpec("llm", "", ("title",))


def _unconstrained(engine):
    def generate(requests, *, progress=False):
        from dataclasses import replace

        return [engine._one(replace(r, choices=None)) for r in requests]

    return generate


def test_prompts_go_in_one_batch_grouped_by_their_shared_prefix(cache):
    engine = FakeEngine()
    table = pa.table({"movie": ["m1", "m2", "m1", "m2", "m1"], "review": list("abcde")})
    run_call(CallSpec("llm", "Say", ("movie", "review")), table, engine=engine, cache=cache)
    assert engine.submitted == 5
    movies = [p.split("\n")[1] for p in engine.prompts]
    assert movies in (["movie: m1"] * 3 + ["movie: m2"] * 2, ["movie: m2"] * 2 + ["movie: m1"] * 3)


def test_calibration_picks_by_logprobs_relative_to_the_null_prompt(cache):
    """A fake engine that always answers "yes" but reports logprobs: the calibrated answer is
    argmax(row - null); the null prompt is sent once; calibrate is part of the cache key."""
    import dataclasses

    from llmql.udfs.batch import calibrated_choice
    from llmql.udfs.prompts import output_signature

    lp = {"N/A": (-1.0, -3.0), "x": (-1.0, -2.0), "y": (-1.0, -4.0), "w": (-0.5, -2.6)}

    class LogprobEngine(FakeEngine):
        def _one(self, request):
            result = super()._one(request)
            yes, no = lp[request.prompt.splitlines()[1].split(": ", 1)[1]]
            return dataclasses.replace(result, text="yes", choice_logprobs={"yes": yes, "no": no})

    table = pa.table({"review": ["x", "y", "w", "x"]})
    spec = CallSpec("llm_filter", "Good?", ("review",))
    engine = LogprobEngine()
    out = run_call(spec, table, engine=engine, cache=cache)
    assert out.values.to_pylist() == [False, True, True, False]
    assert sorted(engine.prompts).count("Good?\nreview: N/A\nAnswer (yes or no):") == 1
    assert out.report.llm_calls == 4  # 3 distinct rows + the null prompt
    plain = dataclasses.replace(spec, options=CallOptions(calibrate=False))
    assert output_signature(plain) != output_signature(spec)
    assert run_call(plain, table, engine=engine, cache=cache).values.to_pylist() == [True] * 4
    assert calibrated_choice("1", {"1": -1.0, "10": -1.0, "2": -3.0}, {"1": -2.0, "10": -2.0,
                                                                       "2": -1.0}) == "1"
    assert calibrated_choice("10", {"1": -1.0, "10": -1.0}, {"1": -2.0, "10": -2.0}) == "10"
    assert calibrated_choice("no", {"yes": -1.0, "no": -2.0}, {}) == "no"


def test_fields_as_written_keep_their_order_and_rows_are_sorted(cache):
    table = pa.table({"review": list("cbade"), "movie": ["m1", "m2", "m1", "m2", "m1"]})
    fixed = FakeEngine()  # NOTE: the default: fields as written, rows sorted
    run_call(CallSpec("llm", "Say", ("review", "movie")), table, engine=fixed, cache=cache)
    assert [p.split("\n")[1] for p in fixed.prompts] == [f"review: {c}" for c in "abcde"]
    reordered = FakeEngine()
    spec = CallSpec("llm", "Say", ("review", "movie"), CallOptions(reorder_fields=True))
    out = run_call(spec, table, engine=reordered, cache=cache)
    assert all(p.split("\n")[1].startswith("movie: ") for p in reordered.prompts)  # shared field first
    assert [p.split("\n")[1] for p in reordered.prompts][:3] == ["movie: m1"] * 3  # grouped by it
    assert out.report.cache_hits == 0  # answers to written-order prompts are not reused
    with pytest.raises(UDFError, match="reorder_fields must be a boolean"):
        CallOptions(reorder_fields="no")


def test_calibration_prompt_is_submitted_beside_the_rows_and_held_answers_wait_for_it(cache):
    """With an engine that answers in the background (FIFO), the content-free prompt goes
    through `submit` while rows are still in flight; answers that arrive before it are held,
    then calibrated like the rest."""
    import dataclasses
    import threading
    import time
    from concurrent.futures import Future

    lp = {"N/A": (-1.0, -3.0), "x": (-1.0, -2.0), "y": (-1.0, -4.0), "w": (-0.5, -2.6), "v": (-1.0, -1.5)}

    class BackgroundEngine(FakeEngine):
        def _one(self, request):
            result = super()._one(request)
            yes, no = lp[request.prompt.splitlines()[1].split(": ", 1)[1]]
            return dataclasses.replace(result, text="yes", choice_logprobs={"yes": yes, "no": no})

        def submit(self, request, *, on_text=None):
            self.submitted += 1
            future: Future = Future()

            def answer():
                time.sleep(0.01 * self.submitted)
                future.set_result(self.generate([request])[0])

            threading.Thread(target=answer).start()
            return future

    table = pa.table({"review": ["x", "y", "w", "v", "x", "y"]})
    spec = CallSpec("llm_filter", "Good?", ("review",), CallOptions(chunk_size=2))
    engine = BackgroundEngine()
    out = run_call(spec, table, engine=engine, cache=cache)
    assert out.values.to_pylist() == [False, True, True, False, False, True]
    assert engine.submitted == 5  # 4 distinct rows + the null prompt, all through submit
    null = "Good?\nreview: N/A\nAnswer (yes or no):"
    assert engine.prompts.count(null) == 1
    assert out.report.llm_calls == 5
