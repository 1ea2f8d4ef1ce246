"""Scheduling policies on fake requests (no model): ListMLE ranking, SJF order, the starvation
guard, predicted-length KV admission, VTC counters, lift and weights."""

from __future__ import annotations

import numpy as np
import pytest

from llmql.engine.kvcache.base import create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.fair import FairPolicy
from llmql.engine.scheduler.ltr import LTRPolicy
from llmql.engine.scheduler.policy import create_policy
from llmql.engine.scheduler.predictor import (
    LengthPredictor,
    features,
    listmle_grad,
    listmle_loss,
    template_key,
)
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.engine.types import GenerationRequest

LONG_WORD = 7  # prompts holding this token get long answers in these fake workloads


def _kv(slots: int = 10_000) -> CacheManager:
    pool = KVPool(slots, 1, 1, 1)
    return CacheManager(pool, create_prefix_cache("none", pool))


def _req(rid: int, ids: list[int], *, instruction: str = "Say", tenant: str | None = None,
         max_tokens: int = 64, policy: str | None = None) -> Req:
    params = GenerationRequest(f"{instruction}\nx", max_tokens=max_tokens, tenant=tenant,
                               policy=policy)
    return Req(rid, list(ids), params, max_tokens)


def _finish(policy: LTRPolicy, req: Req, length: int) -> None:
    req.token_ids += [5] * length
    req.finish("length")
    policy.on_finish(req)


def _ids(seed: int, long: bool) -> list[int]:
    """A fake prompt like the training ones (LONG_WORD marks a long answer)."""
    tokens = np.random.default_rng(seed).integers(10, 90, size=8)
    return [int(t) for t in tokens] + ([LONG_WORD, 8] if long else [9, 6])


def _trained_ltr(n: int = 96, seed: int = 0) -> LTRPolicy:
    """An LTR policy that saw `n` finished requests: long iff the prompt holds LONG_WORD."""
    rng = np.random.default_rng(seed)
    policy = create_policy("ltr")
    policy.bind(_kv())
    for i in range(n):
        long = bool(rng.integers(2))
        ids = _ids(seed * 1000 + i, long)
        _finish(policy, _req(i, ids), int(rng.integers(40, 60) if long else rng.integers(1, 4)))
    return policy


def test_listmle_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    x, w, lengths = rng.normal(size=(6, 5)), rng.normal(size=5), rng.integers(1, 50, size=6)
    grad = listmle_grad(w, x, lengths) * len(lengths)
    eps = 1e-6
    numeric = [(listmle_loss(w + eps * e, x, lengths) - listmle_loss(w - eps * e, x, lengths))
               / (2 * eps) for e in np.eye(5)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_predictor_falls_back_then_ranks_by_learned_length() -> None:
    predictor = LengthPredictor(min_samples=16)
    key = template_key(GenerationRequest("Say\nx"), [1, 2])
    assert predictor.predict(key, features([1, 2], 64)) is None  # FCFS fallback
    policy = _trained_ltr()
    short = np.median([policy.predicted(_req(1000 + i, _ids(900 + i, False))) for i in range(30)])
    long = np.median([policy.predicted(_req(1100 + i, _ids(1100 + i, True))) for i in range(30)])
    assert short < 10 < 30 < long  # held-out prompts: real lengths 1-3 and 40-59


def test_sjf_order_unknown_templates_first_then_shortest() -> None:
    policy = _trained_ltr()
    long1, short1, long2, short2 = (_req(2000 + i, _ids(800 + i, i % 2 == 0)) for i in range(4))
    new = _req(2010, [1, 2, 3], instruction="A template never seen")
    order = policy.order([long1, short1, new, long2, short2], policy.kv)
    assert order[:3] == [new, short1, short2] and set(order[3:]) == {long1, long2}


def test_starvation_guard_promotes_for_a_quantum_then_demotes() -> None:
    policy = _trained_ltr()
    policy.starve_steps, policy.quantum = 5, 3
    long, short = _req(3000, _ids(700, True)), _req(3001, _ids(701, False))
    runs_short = ScheduledBatch([short], [1], [short.seq_len - 1])
    for _ in range(4):
        policy.on_step(runs_short, [long])
    assert policy.order([long, short], policy.kv) == [short, long]
    policy.on_step(runs_short, [long])
    assert long.extra["quantum"] == 3 and short.extra.get("quantum", 0) == 0
    assert policy.order([long, short], policy.kv)[0] is long  # promoted
    assert policy.victim([long, short]) is short  # a promoted request is not preempted
    batch = ScheduledBatch([long], [1], [long.seq_len - 1])
    for _ in range(3):
        policy.on_step(batch, [])
    assert long.extra["quantum"] == 0 and long.extra["idle"] == 0
    assert policy.order([long, short], policy.kv) == [short, long]  # demoted


def test_admission_reserves_predicted_not_max_tokens() -> None:
    policy = _trained_ltr()
    policy.bind(_kv(slots=100))
    running = [_req(4000 + i, _ids(600 + i, False)) for i in range(3)]  # short answers predicted
    candidate = _req(4010, _ids(610, False))
    assert policy.admit(candidate, [], running)  # 3 x max_tokens (192) would not fit in 100
    long_running = [_req(4020 + i, _ids(620 + i, True)) for i in range(2)]
    assert not policy.admit(candidate, [], long_running + running)
    assert policy.victim(long_running + running) in long_running


def test_vtc_charges_input_and_output_with_weights() -> None:
    policy = FairPolicy(weights={"b": 2.0})
    policy.bind(_kv())
    a, b = _req(1, [1] * 10, tenant="a"), _req(2, [1] * 10, tenant="b")
    for r in (a, b):
        policy.on_add(r, [], [])
    batch = ScheduledBatch([a, b], [10, 10], [0, 0])
    policy.on_step(batch, [])
    assert policy.counters == {"a": 10 + 2, "b": (10 + 2) / 2}
    policy.on_step(ScheduledBatch([a], [1], [a.seq_len - 1]), [b])  # a decodes; prompt not re-charged
    assert policy.counters["a"] == 14


def test_vtc_lift_when_a_tenant_becomes_backlogged_and_interleaving() -> None:
    policy = FairPolicy()
    policy.bind(_kv())
    big = [_req(i, [1] * 4, tenant="big") for i in range(6)]
    waiting: list[Req] = []
    for r in big:
        policy.on_add(r, waiting, [])
        waiting.append(r)
    policy.counters["big"] = 100.0
    policy.counters["small"] = 3.0  # long idle: must not bank credit
    small = [_req(10 + i, [1] * 4, tenant="small") for i in range(2)]
    policy.on_add(small[0], waiting, [])
    assert policy.counters["small"] == 100.0
    policy.on_add(small[1], [*waiting, small[0]], [])  # already backlogged: no lift
    assert policy.counters["small"] == 100.0
    policy.counters["big"] = 105.0
    order = policy.order([*waiting, *small], policy.kv)
    assert [r.params.tenant for r in order[:4]] == ["small", "small", "big", "big"]
    assert policy.victim([big[0], small[0]]) is big[0]


@pytest.mark.parametrize("name", ["fcfs", "lpm", "ltr", "fair"])
def test_registry(name) -> None:
    assert create_policy(name).name == name
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        create_policy("sjf")


def test_running_requests_nearest_their_end_keep_memory() -> None:
    """When the pool is full, the running request with the longest predicted remaining output
    is preempted, whatever its admission order, and the short ones run this step."""
    from llmql.engine.scheduler.scheduler import Scheduler

    policy = _trained_ltr()
    kv = _kv(slots=30)
    sched = Scheduler(kv, policy, chunk_size=16, max_batch_tokens=64)
    long, short1, short2 = (_req(5000 + i, _ids(500 + i, i == 0)) for i in range(3))
    for req in (long, short1, short2):  # prompts computed, one output token to feed back
        kv.attach(req, kv.match(req))
        assert kv.grow(req, req.seq_len)
        req.num_computed = req.seq_len
        req.token_ids.append(5)
        sched.running.append(req)
    assert kv.available == 0
    assert policy.order_running(sched.running)[-1] is long
    batch, failed = sched.schedule()
    assert not failed and batch is not None
    assert set(batch.reqs) == {short1, short2} and list(sched.waiting) == [long]
    assert sched.preemptions == 1


@pytest.mark.parametrize("engine_policy", ["ltr", "fair"])
def test_per_query_policy_orders_its_requests_within_their_places(engine_policy) -> None:
    """A query asking for `fcfs` gets its requests in arrival order, in the places the
    engine's policy gave that query (the share between queries is unchanged); one asking
    for `ltr` on an fcfs engine is left as is (no predictor there)."""
    policy = _trained_ltr()
    if engine_policy == "fair":
        trained, policy = policy, FairPolicy()
        policy.predictor = trained.predictor
        policy.bind(_kv())
    mine = [_req(6000 + i, _ids(400 + i, i % 2 == 0), tenant="q", policy="fcfs") for i in range(4)]
    other = [_req(6010 + i, _ids(410 + i, i % 2 == 1), tenant="q" if engine_policy == "ltr" else "r")
             for i in range(4)]
    waiting = [*mine, *other]
    base = policy.order(waiting, policy.kv)
    arranged = policy.arrange(waiting, policy.kv)
    places = [i for i, r in enumerate(base) if r in mine]
    assert [arranged[i] for i in places] == mine  # arrival order, same places
    assert [r for r in arranged if r not in mine] == [r for r in base if r not in mine]
    assert [base[i] for i in places] != mine  # the engine's own order differs
    fcfs = create_policy("fcfs")
    asks_ltr = [_req(r.rid, r.token_ids, tenant="q", policy="ltr") for r in mine]
    assert fcfs.arrange(asks_ltr, _kv()) == asks_ltr



def test_fair_caps_prefill_of_tenants_ahead_while_one_behind_runs() -> None:
    policy = FairPolicy(shared_step_tokens=64)
    policy.bind(_kv())
    small = _req(7000, [1] * 5, tenant="small")
    big = [_req(7001 + i, [2] * 40, tenant="big") for i in range(3)]
    policy.counters.update({"small": 10.0, "big": 1000.0})
    assert policy.admit(big[0], [], [small])  # one request always
    assert not policy.admit(big[1], [big[0]], [small])  # 80 new tokens > 64 while small runs
    assert policy.admit(big[1], [big[0]], [])  # nobody behind: the full budget
    assert policy.admit(small, [big[0], big[1]], [small])  # the tenant behind is never capped
    policy.counters["small"] = 2000.0  # small got more service: big is behind now
    assert policy.admit(big[1], [big[0]], [small])


def test_fair_tenant_lifted_level_is_behind_once_the_large_one_is_picked() -> None:
    """A small tenant lifted to the large one's counter starts in the same step: the large
    one's admissions count, so it gets one request, not the full budget, beside it."""
    policy = FairPolicy(shared_step_tokens=64)
    policy.bind(_kv())
    small = _req(7100, [1] * 5, tenant="small")
    big = [_req(7101 + i, [2] * 40, tenant="big") for i in range(3)]
    policy.counters.update({"small": 500.0, "big": 500.0})
    assert policy.admit(big[0], [small], [])
    assert not policy.admit(big[1], [small, big[0]], [])
    other = [_req(7110 + i, [3] * 40, tenant="other") for i in range(2)]
    policy.counters["other"] = 500.0  # two large tenants level: neither is held back long
    assert policy.admit(other[1], [big[0], big[1], other[0]], [])
