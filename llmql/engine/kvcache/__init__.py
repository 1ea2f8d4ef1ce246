"""KV memory: the paged pool and the prefix caches over it (chosen by `create_prefix_cache`)."""

from llmql.engine.kvcache.base import (
    BasePrefixCache,
    MatchResult,
    NoPrefixCache,
    create_prefix_cache,
    register_prefix_cache,
)
from llmql.engine.kvcache.pool import KVPool

__all__ = [
    "BasePrefixCache",
    "KVPool",
    "MatchResult",
    "NoPrefixCache",
    "create_prefix_cache",
    "register_prefix_cache",
]
