"""Prefill admission: which waiting requests start this step, and how many tokens each."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llmql.engine.scheduler.cache import CacheManager, cache_namespace
from llmql.engine.scheduler.policy import SchedulingPolicy
from llmql.engine.scheduler.request import Req


class AdmissionCheck(Protocol):
    """A veto the admitter consults besides the policy (e.g. `lora.AdapterAdmission`)."""

    def allows(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool: ...


class PrefillAdmitter:
    """Admits waiting requests in policy order within a token budget and free memory.

    A request that shares more than `defer_tokens` uncached tokens with one admitted in the
    same step, or with a running one whose prompt is still being prefilled (chunked), under
    the same cache namespace (LoRA adapter and `cache_salt`: `cache_namespace`), waits, so
    that it reuses that request's prefix from the cache instead of computing it a second
    time (in-batch prefix sharing).
    """

    def __init__(
        self,
        kv: CacheManager,
        policy: SchedulingPolicy,
        *,
        chunk_size: int,
        max_running: int,
        defer_tokens: int = 16,
        checks: Sequence[AdmissionCheck] = (),
    ) -> None:
        self.kv, self.policy = kv, policy
        self.chunk_size, self.max_running, self.defer_tokens = chunk_size, max_running, defer_tokens
        self.checks = tuple(checks)

    def admit(self, waiting: deque[Req], running: list[Req], budget: int) -> list[tuple[Req, int]]:
        """Move admitted requests from `waiting` to `running`; returns (req, new tokens)."""
        picked: list[tuple[Req, int]] = []
        # NOTE: running prompts not fully computed yet (their chunks enter the cache step by step)
        prefilling = [r for r in running if r.num_computed < r.seq_len - 1] if self.kv.caching else []
        for req in self.policy.arrange(waiting, self.kv):
            if budget <= 0 or len(running) + len(picked) >= self.max_running:
                break
            reqs = [r for r, _ in picked]
            if not self.policy.admit(req, reqs, running) or not self._allowed(req, reqs, running):
                continue
            n = self._try_start(req, picked, prefilling, budget, len(running) + len(picked) + 1)
            if n is None:
                break
            if n:
                picked.append((req, n))
                budget -= n
        now = time.perf_counter()
        for req, _ in picked:
            waiting.remove(req)
            running.append(req)
            req.extra.setdefault("admitted", now)
        return picked

    def _allowed(self, req: Req, picked: list[Req], running: list[Req]) -> bool:
        return all(check.allows(req, picked, running) for check in self.checks)

    def _try_start(
        self, req: Req, picked: list[tuple[Req, int]], prefilling: list[Req], budget: int,
        decoders: int,
    ) -> int | None:
        """New tokens for `req` (0: defer it; None: out of memory, stop admitting)."""
        match = self.kv.match(req)
        if self._defer(req, [*prefilling, *(r for r, _ in picked)], match.length):
            return 0
        first = req.cached_tokens < 0
        self.kv.attach(req, match)
        # NOTE: keep one slot per running request for its next decode step
        room = self.kv.available - decoders
        n = min(req.seq_len - match.length, self.chunk_size, budget, room)
        if n <= 0 or not self.kv.grow(req, n):
            self.kv.release(req, keep_prefix=False)
            req.cached_tokens = -1 if first else req.cached_tokens
            return None
        return n

    def _defer(self, req: Req, computing: list[Req], matched: int) -> bool:
        """Whether `req` shares more than `defer_tokens` uncached tokens with a request of
        `computing` (this step's) under the same cache namespace."""
        if not self.kv.caching or not computing:
            return False
        mine, key = np.asarray(req.token_ids[: req.seq_len - 1]), cache_namespace(req)
        return any(cache_namespace(o) == key and _lcp(mine, o.token_ids) - matched > self.defer_tokens
                   for o in computing)


def _lcp(a: np.ndarray, b: list[int]) -> int:
    """Length of the common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
