"""KV memory for requests: pool slots plus the prefix cache (mini-sglang `scheduler/cache.py`)."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from llmql.engine.kvcache.base import BasePrefixCache, MatchResult, NoPrefixCache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.lora.admission import adapter_key
from llmql.engine.scheduler.request import Req

_NO_SLOTS = torch.empty(0, dtype=torch.int64)


class CacheManager:
    """Allocates slots for requests, shares prefixes through the cache, frees on exit."""

    def __init__(self, pool: KVPool, cache: BasePrefixCache) -> None:
        self.pool = pool
        self.cache = cache
        self.evicted_tokens = 0

    @property
    def caching(self) -> bool:
        """Whether prefixes are shared at all (the cache is on)."""
        return not isinstance(self.cache, NoPrefixCache)

    @property
    def available(self) -> int:
        """Slots free now or after evicting unlocked cache entries."""
        return self.pool.free_slots + self.cache.evictable_size

    def match(self, req: Req) -> MatchResult:
        """The cached prefix of `req`, leaving at least its last token to compute."""
        return self.cache.match_prefix(req.token_ids[: req.seq_len - 1], cache_namespace(req))

    def attach(self, req: Req, match: MatchResult) -> None:
        """Start `req` on the matched prefix (locks it)."""
        self.cache.lock(match.node)
        req.node, req.slots = match.node, match.slots
        req.cached_len = req.num_computed = match.length
        if req.cached_tokens < 0:
            req.cached_tokens = min(match.length, req.prompt_len)

    def grow(self, req: Req, n: int) -> bool:
        """Append `n` fresh slots to `req.slots` (evicting if needed); False if out of memory."""
        slots = self.pool.alloc(n)
        if slots is None:
            self.evicted_tokens += self.cache.evict(n - self.pool.free_slots)
            slots = self.pool.alloc(n)
        if slots is None:
            return False
        req.slots = torch.cat([req.slots, slots])
        return True

    def cache_prefix(self, req: Req) -> None:
        """Insert `req`'s computed tokens into the cache and adopt the cache's slots."""
        if not self.caching:
            return
        ids, own = req.token_ids[: req.num_computed], req.slots[: req.num_computed]
        existing = self.cache.insert(ids, own, cache_namespace(req))
        if existing > req.cached_len:  # NOTE: the cache kept its own copies of these tokens
            self.pool.free(own[req.cached_len : existing])
        match = self.cache.match_prefix(ids, cache_namespace(req))
        self.cache.lock(match.node)
        self.cache.unlock(req.node)
        req.node, req.cached_len = match.node, match.length
        req.slots = torch.cat([match.slots, req.slots[match.length :]])

    def release(self, req: Req, *, keep_prefix: bool = True) -> None:
        """Give back `req`'s memory; with `keep_prefix` its computed tokens stay cached."""
        if keep_prefix:
            self.cache_prefix(req)
        self.cache.unlock(req.node)
        self.pool.free(req.slots[req.cached_len :])
        req.node, req.slots, req.cached_len, req.num_computed = None, _NO_SLOTS, 0, 0


def cache_namespace(req: Req) -> Hashable:
    """The prefix-cache namespace of `req`: its adapter's fingerprint, paired with its
    `cache_salt` when it has one (requests share cached K/V only within a namespace)."""
    salt = req.params.cache_salt
    return adapter_key(req) if salt is None else (adapter_key(req), salt)
