"""Scheduling policies: the order in which waiting requests are admitted.

The prefill admitter consults a `SchedulingPolicy`; policies plug in here rather than as
branches in the loop: `fcfs`, `lpm` (longest cached prefix), `ltr` (learned-length SJF,
`ltr.py`) and `fair` (VTC across tenants, `fair.py`). The scheduler tells the policy what
happens through hooks (`on_add`, `on_step`, `on_finish`) and asks it for a preemption
`victim`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.request import Req, ScheduledBatch


class SchedulingPolicy(ABC):
    """Orders the waiting queue and may veto single admissions."""

    name: str = "base"
    inner: str = "fcfs"  # how requests of one tenant are ordered among themselves

    @abstractmethod
    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        """The waiting requests in the order to try admitting them.

        Args:
            waiting: the queue, oldest first (preempted requests go to the front).
            kv: the cache manager, for cache-aware policies.
        """

    def arrange(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        """`order`, then each tenant's requests that ask for an order of their own
        (`GenerationRequest.policy`) sorted that way among the places they hold: the
        policy decides how many of a tenant's requests go early, the request which ones.
        Promoted requests (starvation guard) keep their places."""
        ordered = self.order(waiting, kv)
        groups: dict[tuple[str | None, str], list[int]] = {}
        for i, req in enumerate(ordered):
            own = req.params.policy
            if own is not None and own != self.inner and req.extra.get("quantum", 0) <= 0:
                groups.setdefault((req.params.tenant, own), []).append(i)
        for (_, own), places in groups.items():
            key = self.sort_key if own == "ltr" and hasattr(self, "sort_key") else _arrival
            for i, req in zip(places, sorted((ordered[i] for i in places), key=key)):
                ordered[i] = req
        return ordered

    def admit(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool:
        """Whether `req` may join this step (after `picked`, next to `running`)."""
        return True

    def bind(self, kv: CacheManager) -> None:
        """Called once by the scheduler that owns this policy."""
        self.kv = kv

    def on_add(self, req: Req, waiting: Sequence[Req], running: Sequence[Req]) -> None:
        """`req` joins the waiting queue (before it is appended)."""
        return None

    def on_step(self, batch: ScheduledBatch, waiting: Sequence[Req]) -> None:
        """A step ran over `batch`; `waiting` are the requests that did not run."""
        return None

    def on_finish(self, req: Req) -> None:
        """`req` finished (stop, length or error)."""
        return None

    def victim(self, candidates: Sequence[Req]) -> Req:
        """Which running request to preempt when memory runs out (default: the newest)."""
        return candidates[-1]

    def order_running(self, running: Sequence[Req]) -> list[Req]:
        """The order in which running requests claim this step's token budget and KV slots
        (earlier ones are kept when memory runs out; default: admission order)."""
        return list(running)

    def predicted_tokens(self, template: str) -> float | None:
        """Mean predicted output tokens of a call template (None: no prediction)."""
        return None


def _arrival(req: Req) -> int:
    return req.rid


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: the order the requests arrived in."""

    name = "fcfs"

    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        return list(waiting)


class LongestPrefixPolicy(SchedulingPolicy):
    """Cache-aware: longest cached prefix first (SGLang's LPM); FCFS among equals."""

    name = "lpm"
    inner = "lpm"

    def __init__(self, max_queue: int = 1024) -> None:
        self.max_queue = max_queue  # NOTE: beyond this many waiting, matching costs too much

    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        if len(waiting) > self.max_queue or not kv.caching:
            return list(waiting)
        lengths = {r.rid: kv.match(r).length for r in waiting}
        return sorted(waiting, key=lambda r: -lengths[r.rid])


def _ltr() -> SchedulingPolicy:
    from llmql.engine.scheduler.ltr import LTRPolicy

    return LTRPolicy()


def _fair() -> SchedulingPolicy:
    from llmql.engine.scheduler.fair import FairPolicy

    return FairPolicy()


_POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "lpm": LongestPrefixPolicy,
    "ltr": _ltr,
    "fair": _fair,
}
POLICIES = tuple(_POLICIES)


def create_policy(name: str | SchedulingPolicy) -> SchedulingPolicy:
    """The policy registered as `name` (or `name` itself if already a policy)."""
    if isinstance(name, SchedulingPolicy):
        return name
    if name not in _POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {sorted(_POLICIES)}")
    return _POLICIES[name]()
