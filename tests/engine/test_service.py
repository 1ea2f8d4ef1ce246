"""The engine as a service (tiny random models): concurrent callers share one step loop and get
the sequential answers; a failing forward fails only its request; cancel and Ctrl-C free
KV memory and radix locks; streaming text adds up to the answer."""

from __future__ import annotations

import _thread
import random
import threading
import time

import pytest
import torch

from llmql.engine.engine import EmbeddedEngine, EngineConfig
from llmql.engine.models import load_model
from llmql.engine.types import ErrorKind, GenerationRequest

POISON = 95  # token id of "w95": the fault-injected runner raises on prompts holding it


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


def _word_prompts(n: int, seed: int = 0, vocab: int = 94) -> list[str]:
    """Prompts sharing an instruction and group prefixes (never the POISON word)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(k))  # noqa: E731
    shared, groups = words(24), [words(rng.randrange(5, 20)) for _ in range(3)]
    return [f"{shared} {groups[i % 3]} {words(rng.randrange(1, 6))}" for i in range(n)]


def _engine(lm, **config) -> EmbeddedEngine:
    return EmbeddedEngine(lm, EngineConfig(**{"kv_tokens": 2048, **config}))


def _answers(results) -> list[tuple]:
    return [(r.text, r.output_tokens, r.finish_reason) for r in results]


def _idle(engine: EmbeddedEngine, timeout: float = 10.0) -> bool:
    """Wait until nothing is in flight; then every pool slot is free or evictable (no lock)."""
    deadline = time.monotonic() + timeout
    while engine.service.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # NOTE: let the engine thread finish the step that emptied it
    return engine.kv.available == engine.pool.num_slots


def _faulty(engine: EmbeddedEngine, delay: float = 0.0) -> None:
    """Make this engine's forward raise on any batch holding a POISON prompt (and sleep)."""
    run = engine.runner.run

    def faulty_run(batch):
        time.sleep(delay)
        if any(POISON in r.token_ids[: r.prompt_len] for r in batch.reqs):
            raise RuntimeError("injected forward failure")
        return run(batch)

    engine.runner.run = faulty_run  # NOTE: this engine instance only


def test_threads_share_steps_and_get_sequential_answers(tiny) -> None:
    groups = [[GenerationRequest(p, max_tokens=10) for p in _word_prompts(5, seed=s)]
              for s in range(4)]
    expected = [_answers(_engine(tiny).generate(g)) for g in groups]
    engine = _engine(tiny)
    got: dict[int, list] = {}
    barrier = threading.Barrier(len(groups))

    def call(i: int) -> None:
        barrier.wait()
        got[i] = _answers(engine.generate(groups[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(groups))] == expected
    assert engine.stats().requests == 20 and _idle(engine)


def test_submit_futures_and_streamed_text(tiny) -> None:
    engine = _engine(tiny)
    prompts = _word_prompts(3, seed=7)
    expected = _answers(_engine(tiny).generate([GenerationRequest(p, max_tokens=12) for p in prompts]))
    pieces: list[str] = []
    futures = [engine.submit(GenerationRequest(p, max_tokens=12),
                             on_text=pieces.append if i == 0 else None)
               for i, p in enumerate(prompts)]
    assert _answers(f.result(timeout=60) for f in futures) == expected
    assert "".join(pieces) == expected[0][0]


def test_failing_forward_fails_only_its_request(tiny) -> None:
    prompts = _word_prompts(6, seed=1)
    expected = _answers(_engine(tiny).generate([GenerationRequest(p, max_tokens=8) for p in prompts]))
    engine = _engine(tiny)
    _faulty(engine)
    reqs = [GenerationRequest(p, max_tokens=8) for p in prompts]
    reqs.insert(2, GenerationRequest(prompts[0] + " w95", max_tokens=8))
    results = engine.generate(reqs)
    bad = results.pop(2)
    assert bad.finish_reason == "error" and bad.error_kind == ErrorKind.INTERNAL
    assert "injected" in bad.error
    assert _answers(results) == expected
    assert _idle(engine)
    assert _answers(engine.generate([GenerationRequest(p, max_tokens=8) for p in prompts])) == expected


def test_cancel_frees_kv_and_locks(tiny) -> None:
    engine = _engine(tiny, kv_tokens=1024)
    _faulty(engine, delay=0.01)
    prompts = _word_prompts(4, seed=2)
    futures = [engine.submit(GenerationRequest(p, max_tokens=150)) for p in prompts]
    deadline = time.monotonic() + 30
    while not engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.kv.available < engine.pool.num_slots  # running requests hold memory
    engine.cancel(futures[:2])
    futures[2].cancel()
    assert all(f.cancelled() for f in futures[:3])
    assert futures[3].result(timeout=60).finish_reason in ("stop", "length")
    assert _idle(engine)


def test_interrupted_caller_leaves_engine_healthy(tiny) -> None:
    prompts = _word_prompts(4, seed=4)
    reqs = [GenerationRequest(p, max_tokens=9) for p in prompts]
    expected = _answers(_engine(tiny).generate(reqs))
    engine = _engine(tiny)
    _faulty(engine, delay=0.01)
    long = [GenerationRequest(p, max_tokens=150) for p in prompts]

    def interrupt_when_running() -> None:
        while not engine.scheduler.running:
            time.sleep(0.005)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        engine.generate(long)
    assert _idle(engine)
    assert _answers(engine.generate(reqs)) == expected
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(reqs[0])


@pytest.mark.parametrize("policy", ["ltr", "fair"])
def test_policies_keep_greedy_answers(tiny, policy) -> None:
    prompts = _word_prompts(24, seed=9)
    reqs = [GenerationRequest(p, max_tokens=2 + 9 * (i % 3 == 0), tenant=f"t{i % 2}")
            for i, p in enumerate(prompts)]
    expected = _answers(_engine(tiny, policy="fcfs").generate(reqs))
    engine = _engine(tiny, policy=policy, max_running=4)
    assert _answers(engine.generate(reqs)) == expected
    assert _answers(engine.generate(reqs[::-1])) == expected[::-1]  # now with predictions
    assert _idle(engine)


def test_explain_predicts_tokens_report_shows_queue_wait_tenants(tiny) -> None:
    import llmql

    engine = _engine(tiny, policy="fair")
    con = llmql.connect(engine=engine, max_tokens=6, result_cache=False)
    con.execute("CREATE TABLE t AS SELECT 'w' || (i % 90 + 4) || ' w' || (i % 7 + 4) AS a "
                "FROM range(40) r(i)")
    query = "SELECT llm('w5 w6', a) FROM t"
    assert "predicted output tokens" not in con.explain(query)
    assert all(v is not None for (v,) in con.sql(query).fetchall())
    report = con.last_report()
    assert "queue" in report.calls[0].report.seconds and "queue" in str(report)
    assert "predicted output tokens per row" in con.explain(query)
    con.sql("SELECT llm('w7', a, tenant := 'alice') FROM t LIMIT 2").fetchall()
    assert "alice" in engine.scheduler.policy.counters
    assert sum(t.startswith("query-") for t in engine.scheduler.policy.counters) == 1


def test_idle_engine_thread_ends_and_unused_engine_is_freed(tiny) -> None:
    """The step-loop thread ends after a short idle spell (a later submit starts another), so
    an engine nobody references is garbage-collected with its KV pool."""
    import gc
    import weakref

    engine = _engine(tiny)
    first = engine.generate([GenerationRequest("w5 w6", max_tokens=2)])
    deadline = time.monotonic() + 10
    while engine.service._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.service._thread is None
    again = engine.generate([GenerationRequest("w5 w6", max_tokens=2)])  # NOTE: restarts it
    assert again[0].text == first[0].text and again[0].cached_tokens > 0
    ref = weakref.ref(engine.pool)
    del engine
    deadline = time.monotonic() + 10
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None


def test_per_query_policy_option(tiny) -> None:
    """`policy := 'fcfs'` on a call reaches the engine's requests and leaves the answers as
    they are; a bad value fails before any model call; a bad request value fails alone."""
    import llmql
    from llmql.udfs.types import UDFError

    engine = _engine(tiny, policy="ltr")
    con = llmql.connect(engine=engine, max_tokens=4, result_cache=False)
    con.execute("CREATE TABLE t AS SELECT 'w' || (i % 90 + 4) AS a FROM range(12) r(i)")
    plain = con.sql("SELECT llm('w5 w6', a) FROM t ORDER BY a").fetchall()
    seen: list = []
    submit = engine.submit
    engine.submit = lambda request, **kw: (seen.append(request.policy), submit(request, **kw))[1]
    own = con.sql("SELECT llm('w5 w6', a, policy := 'fcfs') FROM t ORDER BY a").fetchall()
    assert own == plain and seen and set(seen) == {"fcfs"}
    with pytest.raises((UDFError, ValueError), match="policy"):
        con.sql("SELECT llm('w5 w6', a, policy := 'sjf') FROM t").fetchall()
    bad, good = engine.generate([GenerationRequest("w5 w6", max_tokens=2, policy="sjf"),
                                 GenerationRequest("w5 w6", max_tokens=2, policy="fcfs")])
    assert bad.error_kind == "bad_request" and "policy" in bad.error
    assert good.finish_reason != "error"
    engine.close()
