"""Continuous-batching scheduler: request state, KV manager, prefill admitter, policies."""

from llmql.engine.scheduler.cache import CacheManager
from llmql.engine.scheduler.policy import (
    FCFSPolicy,
    LongestPrefixPolicy,
    SchedulingPolicy,
    create_policy,
)
from llmql.engine.scheduler.request import Req, ScheduledBatch
from llmql.engine.scheduler.scheduler import Scheduler

__all__ = [
    "CacheManager",
    "FCFSPolicy",
    "LongestPrefixPolicy",
    "Req",
    "ScheduledBatch",
    "Scheduler",
    "SchedulingPolicy",
    "create_policy",
]
