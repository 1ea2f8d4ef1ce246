"""Scheduling policies: the order in which waiting requests are admitted.

The prefill admitter consults a `SchedulingPolicy`; new policies (LoRA-aware admission,
learned-length SJF, fair share) plug in here rather than as branches in the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.request import Req


class SchedulingPolicy(ABC):
    """Orders the waiting queue and may veto single admissions."""

    name: str = "base"

    @abstractmethod
    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        """The waiting requests in the order to try admitting them.

        Args:
            waiting: the queue, oldest first (preempted requests go to the front).
            kv: the cache manager, for cache-aware policies.
        """

    def admit(self, req: Req, picked: Sequence[Req], running: Sequence[Req]) -> bool:
        """Whether `req` may join this step (after `picked`, next to `running`)."""
        return True


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: the order the requests arrived in."""

    name = "fcfs"

    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        return list(waiting)


class LongestPrefixPolicy(SchedulingPolicy):
    """Cache-aware: longest cached prefix first (SGLang's LPM); FCFS among equals."""

    name = "lpm"

    def __init__(self, max_queue: int = 1024) -> None:
        self.max_queue = max_queue  # NOTE: beyond this many waiting, matching costs too much

    def order(self, waiting: Sequence[Req], kv: CacheManager) -> list[Req]:
        if len(waiting) > self.max_queue or not kv.caching:
            return list(waiting)
        lengths = {r.rid: kv.match(r).length for r in waiting}
        return sorted(waiting, key=lambda r: -lengths[r.rid])


_POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "lpm": LongestPrefixPolicy,
}


def create_policy(name: str | SchedulingPolicy) -> SchedulingPolicy:
    """The policy registered as `name` (or `name` itself if already a policy)."""
    if isinstance(name, SchedulingPolicy):
        return name
    if name not in _POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {sorted(_POLICIES)}")
    return _POLICIES[name]()
