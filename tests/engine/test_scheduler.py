"""Scheduler, preemption and cache bookkeeping on a fake model that reads its KV back.

The fake model writes (token, position) into each new token's pool slot and predicts the
next token from the sequence it reads back through `kv_indices`; any slot-table mistake
(wrong prefix reuse, a freed slot still in use, a lost chunk) changes the outputs.
"""

from __future__ import annotations

import random

import pytest
import torch

from llmql.engine.kvcache.base import create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import create_policy
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.engine.scheduler.scheduler import Scheduler
from llmql.engine.types import GenerationRequest

VOCAB = 50


def _next_token(seq: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(seq)) * 7 + len(seq)) % VOCAB


def _expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(_next_token(seq))
    return seq[len(prompt) :]


def _fake_forward(pool: KVPool, batch: ScheduledBatch) -> list[int]:
    k = pool.k_buffer[0]
    out = []
    for req, start, n in zip(batch.reqs, batch.starts, batch.extend_lens):
        assert req.slots.numel() == start + n and len(set(req.slots.tolist())) == start + n
        new = req.slots[start : start + n]
        k[new, 0, 0] = torch.tensor(req.token_ids[start : start + n], dtype=k.dtype)
        k[new, 0, 1] = torch.arange(start, start + n, dtype=k.dtype)
        if start + n == req.seq_len:
            kv = k[req.slots]
            assert kv[:, 0, 1].tolist() == list(range(start + n)), "positions scrambled"
            out.append(_next_token([int(t) for t in kv[:, 0, 0].tolist()]))
    return out


def _run(prompts, max_new, *, slots, cache="radix", page=1, chunk=8, budget=32, policy="fcfs",
         salts=None):
    pool = KVPool(slots, num_layers=1, num_kv_heads=1, head_dim=2)
    kv = CacheManager(pool, create_prefix_cache(cache, pool, page))
    sched = Scheduler(kv, create_policy(policy), chunk_size=chunk, max_batch_tokens=budget)
    salts = salts or [None] * len(prompts)
    reqs = [Req(i, list(p), GenerationRequest(p, max_tokens=max_new, cache_salt=salt), max_new)
            for i, (p, salt) in enumerate(zip(prompts, salts))]
    for r in reqs:
        sched.add(r)

    def on_token(req: Req, tok: int) -> None:
        req.token_ids.append(tok)
        if len(req.output_ids) >= req.max_new_tokens:
            req.finish("length")

    steps = 0
    while sched.has_work:
        batch, failed = sched.schedule()
        assert not failed
        assert batch is not None, "scheduler stalled"
        assert batch.num_tokens <= budget
        sched.postprocess(batch, _fake_forward(pool, batch), on_token)
        steps += 1
        assert steps < 10_000
    assert pool.free_slots + kv.cache.cached_size == slots, "leaked slots"
    assert kv.cache.evictable_size == kv.cache.cached_size, "locks left behind"
    return reqs, sched, kv


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(20)]
    groups = [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 15))] for _ in range(4)]
    out = []
    for i in range(n):
        tail = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))]
        out.append(shared + groups[i % 4] + tail)
    return out


@pytest.mark.parametrize("cache", ["radix", "none"])
@pytest.mark.parametrize("page", [1, 4])
@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_outputs_match_reference(cache: str, page: int, policy: str) -> None:
    prompts = _prompts(12)
    reqs, _, _ = _run(prompts, 6, slots=2048, cache=cache, page=page, policy=policy)
    for r, p in zip(reqs, prompts):
        assert r.output_ids == _expected(p, 6)
    hits = sum(r.cached_tokens for r in reqs)
    assert (hits > 0) == (cache == "radix")


def test_prefix_reuse_defers_in_batch_sharing() -> None:
    prompts = _prompts(8)
    reqs, _, _ = _run(prompts, 2, slots=2048, chunk=64, budget=512)
    # every request after the first reuses at least the shared 20-token instruction
    assert all(r.cached_tokens >= 20 for r in reqs[1:])


def test_prefix_reuse_waits_for_a_chunked_prefill() -> None:
    """A request sharing a long prefix with one still prefilling over several steps waits
    for its chunks to reach the cache instead of computing the same prefix beside it."""
    rng = random.Random(3)
    shared = [rng.randrange(VOCAB) for _ in range(60)]
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(4)] for _ in range(3)]
    reqs, _, _ = _run(prompts, 3, slots=2048, chunk=16, budget=24)
    for r, p in zip(reqs, prompts):
        assert r.output_ids == _expected(p, 3)
    assert all(r.cached_tokens >= 60 - 16 for r in reqs[1:])  # NOTE: 16: `defer_tokens`


def test_cache_salt_isolates_prefix_reuse_and_deferral() -> None:
    """Same prompts under different salts share nothing, neither from the cache nor by
    waiting for one another's chunks; under one salt they share as without salts."""
    rng = random.Random(3)
    shared = [rng.randrange(VOCAB) for _ in range(60)]
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(4)] for _ in range(4)]
    salted, _, kv = _run(prompts, 3, slots=2048, chunk=16, budget=24, salts=["a", "b", "c", "d"])
    for r, p in zip(salted, prompts):
        assert r.output_ids == _expected(p, 3)
    assert [r.cached_tokens for r in salted] == [0, 0, 0, 0]
    assert kv.cache.cached_size >= 4 * 60  # every salt keeps its own copy of the prefix
    same, _, _ = _run(prompts, 3, slots=2048, chunk=16, budget=24, salts=["a"] * 4)
    mixed, _, _ = _run(prompts, 3, slots=2048, chunk=16, budget=24, salts=["a", None, "a", None])
    assert all(r.cached_tokens >= 60 - 16 for r in same[1:])
    assert mixed[1].cached_tokens == 0 and mixed[2].cached_tokens >= 60 - 16
    assert mixed[3].cached_tokens >= 60 - 16


@pytest.mark.parametrize("salts, admitted", [(("a", "b"), 2), (("a", "a"), 1), ((None, None), 1)])
def test_cache_salt_decides_in_step_deferral(salts: tuple, admitted: int) -> None:
    """A request waits for another's chunks (the timing a tenant could observe) only
    when both share a salt."""
    pool = KVPool(256, num_layers=1, num_kv_heads=1, head_dim=2)
    sched = Scheduler(CacheManager(pool, create_prefix_cache("radix", pool)), create_policy("fcfs"),
                      chunk_size=64, max_batch_tokens=256)
    prompt = list(range(40))
    for i, salt in enumerate(salts):
        sched.add(Req(i, list(prompt), GenerationRequest(prompt, cache_salt=salt), 4))
    batch, _ = sched.schedule()
    assert batch is not None and len(batch.reqs) == admitted


def test_small_pool_forces_eviction_and_preemption() -> None:
    prompts = _prompts(10, seed=1)
    reqs, sched, kv = _run(prompts, 40, slots=160, chunk=8, budget=64)
    for r, p in zip(reqs, prompts):
        assert r.output_ids == _expected(p, 40)
    assert sched.preemptions > 0 and kv.evicted_tokens > 0


def test_preemption_without_cache() -> None:
    prompts = _prompts(6, seed=2)
    reqs, sched, _ = _run(prompts, 40, slots=120, cache="none")
    assert sched.preemptions > 0
    for r, p in zip(reqs, prompts):
        assert r.output_ids == _expected(p, 40)


def test_lone_request_that_outgrows_the_pool_fails_cleanly() -> None:
    pool = KVPool(16, num_layers=1, num_kv_heads=1, head_dim=2)
    kv = CacheManager(pool, create_prefix_cache("radix", pool))
    sched = Scheduler(kv, create_policy("fcfs"), chunk_size=8)
    req = Req(0, list(range(10)), GenerationRequest("x", max_tokens=50), 50)
    sched.add(req)
    failed = []
    while sched.has_work:
        batch, f = sched.schedule()
        failed += f
        if batch:
            toks = _fake_forward(pool, batch)
            sched.postprocess(batch, toks, lambda r, t: r.token_ids.append(t))
    assert failed == [req] and req.finish_reason == "length" and req.error
    assert pool.free_slots + kv.cache.cached_size == 16


def test_bad_settings() -> None:
    pool = KVPool(16, num_layers=1, num_kv_heads=1, head_dim=2)
    kv = CacheManager(pool, create_prefix_cache("none", pool))
    with pytest.raises(ValueError):
        Scheduler(kv, create_policy("fcfs"), chunk_size=0)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        create_policy("sjf")


def _on_token(req: Req, tok: int) -> None:
    req.token_ids.append(tok)
    if len(req.output_ids) >= req.max_new_tokens:
        req.finish("length")


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_newcomer_tenant_waits_one_small_step_under_fair(policy: str) -> None:
    """A large tenant's prefill backlog is cut into steps of at most the token budget; a small
    tenant that arrives between two steps starts in the next one under `fair` (in what is
    left of the budget after the running requests' chunks) and finishes before most of the
    backlog; under `fcfs` it waits behind the backlog. Answers stay exact either way."""
    budget = 32
    pool = KVPool(4096, num_layers=1, num_kv_heads=1, head_dim=2)
    kv = CacheManager(pool, create_prefix_cache("radix", pool))
    sched = Scheduler(kv, create_policy(policy), chunk_size=16, max_batch_tokens=budget)
    big = [Req(i, p, GenerationRequest("big", max_tokens=2, tenant="big"), 2)
           for i, p in enumerate(_prompts(60, seed=3))]
    small = [Req(100 + i, p[-6:], GenerationRequest("small", max_tokens=3, tenant="small"), 3)
             for i, p in enumerate(_prompts(3, seed=4))]
    for r in big:
        sched.add(r)
    small_done = -1
    started: list[set[Req]] = []
    seen: set[Req] = set()
    for step in range(100):
        if step == 2:
            for r in small:
                sched.add(r)
        batch, failed = sched.schedule()
        assert not failed and batch is not None and batch.num_tokens <= budget
        if step in (2, 3):
            started.append({r for r in batch.reqs if r in small and r not in seen})
        seen.update(batch.reqs)
        done = sched.postprocess(batch, _fake_forward(pool, batch), _on_token)
        small_done = step if set(done) & set(small) else small_done
        if not sched.has_work:
            break
    assert not sched.has_work
    for r in (*big, *small):
        assert r.output_ids == _expected(r.token_ids[: r.prompt_len], r.max_new_tokens)
    if policy == "fair":
        assert started[0] and started[0] | started[1] == set(small)
        assert small_done <= 2 + 4 < step - 4  # done before most of the backlog
    else:
        assert not started[0] | started[1] and small_done >= step - 1
