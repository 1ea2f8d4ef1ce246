"""Continuous batching: decode the running requests, continue chunked prefills, admit new
ones (chunked, reusing cached prefixes), preempt when KV memory runs out."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import SchedulingPolicy
from llmql.engine.scheduler.prefill import AdmissionCheck, PrefillAdmitter
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.engine.types import ErrorKind

OOM_MESSAGE = "KV pool exhausted: the sequence no longer fits in the KV memory"


class Scheduler:
    """Thin coordinator over the cache manager and the prefill admitter.

    Every step holds each running request's next chunk (1 token when decoding, up to
    `chunk_size` when prefilling) within `max_batch_tokens`, then newly admitted requests.
    """

    def __init__(
        self,
        kv: CacheManager,
        policy: SchedulingPolicy,
        *,
        chunk_size: int = 512,
        max_batch_tokens: int = 2048,
        max_running: int = 64,
        checks: Sequence[AdmissionCheck] = (),
    ) -> None:
        if min(chunk_size, max_batch_tokens, max_running) <= 0:
            raise ValueError("chunk_size, max_batch_tokens and max_running must be positive")
        self.kv, self.policy = kv, policy
        policy.bind(kv)
        self.chunk_size, self.max_batch_tokens = chunk_size, max_batch_tokens
        self.admitter = PrefillAdmitter(kv, policy, chunk_size=chunk_size, max_running=max_running,
                                        checks=checks)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.preemptions = 0

    def add(self, req: Req) -> None:
        self.policy.on_add(req, self.waiting, self.running)
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[ScheduledBatch | None, list[Req]]:
        """The next batch, and the requests that had to stop for lack of memory."""
        items: list[tuple[Req, int]] = []
        failed: list[Req] = []
        budget = self.max_batch_tokens
        for req in self.policy.order_running(self.running):
            if req not in self.running:  # preempted by an earlier request of this loop
                continue
            n = min(req.remaining, self.chunk_size, budget)
            if n <= 0:
                break
            if self._reserve(req, n, {r for r, _ in items}):
                items.append((req, n))
                budget -= n
            elif items or len(self.running) > 1:
                self._preempt(req)
            else:
                failed.append(self._fail(req))
        items += self.admitter.admit(self.waiting, self.running, budget)
        if not items:
            return None, failed
        starts = [r.num_computed for r, _ in items]
        return ScheduledBatch([r for r, _ in items], [n for _, n in items], starts), failed

    def postprocess(
        self, batch: ScheduledBatch, tokens: list[int], on_token: Callable[[Req, int], None]
    ) -> list[Req]:
        """Advance the batch by its forward and sampled `tokens`; returns finished requests."""
        self.policy.on_step(batch, self.waiting)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.num_computed += n
        for req, tok in zip(batch.sampled_reqs, tokens):
            on_token(req, tok)
        done = []
        for req, n in zip(batch.reqs, batch.extend_lens):
            if req.finished:
                self.kv.release(req)
                self.running.remove(req)
                done.append(req)
                self.policy.on_finish(req)
            elif n > 1:
                self.kv.cache_prefix(req)
        return done

    def _reserve(self, req: Req, n: int, scheduled: set[Req]) -> bool:
        """Grow `req` by `n` slots, preempting later unscheduled requests if needed."""
        while not self.kv.grow(req, n):
            victims = [r for r in self.running if r is not req and r not in scheduled]
            if not victims:
                return False
            self._preempt(self.policy.victim(victims))
        return True

    def _preempt(self, req: Req) -> None:
        """Free `req`'s unshared slots and queue it again (its prefix may stay cached)."""
        self.kv.release(req)
        self.running.remove(req)
        self.waiting.appendleft(req)
        req.preemptions += 1
        self.preemptions += 1

    def _fail(self, req: Req) -> Req:
        self.kv.release(req, keep_prefix=False)
        self.running.remove(req)
        req.finish("length" if req.output_ids else "error", OOM_MESSAGE, ErrorKind.CONTEXT_OVERFLOW)
        return req
