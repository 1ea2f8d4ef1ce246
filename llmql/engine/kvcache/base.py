"""The prefix-cache contract (mini-sglang `kvcache/base.py`) and its registry.

A prefix cache maps token-id prefixes to the KV pool slots that hold their K/V, so a new
request whose prompt starts with a cached prefix skips computing it. The cache works in
whole pages of `page_size` tokens: matches and inserts are truncated to a page multiple.

Ownership: slots handed to `insert` for tokens that were not cached yet belong to the
cache from then on (it frees them on eviction); slots of tokens that were already cached
stay with the caller, who must free its duplicates. A request *locks* the node it matched
so that its prefix cannot be evicted while it runs, and unlocks it when done.

Namespaces: K/V depend on more than the tokens when a LoRA adapter is applied, so lookups and
inserts take a `namespace` (the adapter's fingerprint; None for the base model; paired with
the request's `cache_salt` when it has one: `scheduler.cache.cache_namespace`) and never
match across namespaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmql.engine.kvcache.pool import KVPool


@dataclass(frozen=True)
class MatchResult:
    """The cached part of a token sequence.

    Attributes:
        length: matched tokens (a multiple of the page size).
        slots: [length] int64 pool slots of those tokens, in position order.
        node: opaque handle of the deepest matched node, for `lock`/`unlock` (None: nothing).
    """

    length: int
    slots: torch.Tensor
    node: Any = None


class BasePrefixCache(ABC):
    """Token-prefix → KV-slot cache over a `KVPool` (see the module docstring)."""

    def __init__(self, pool: KVPool, page_size: int = 1) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.pool = pool
        self.page_size = page_size

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int], namespace: Hashable = None) -> MatchResult:
        """The longest cached prefix of `token_ids`, in whole pages; refreshes its LRU time.

        Args:
            token_ids: the sequence to look up.
            namespace: only entries inserted under the same namespace match.
        Returns:
            MatchResult with the matched length, its slots and the node to lock.
        """

    @abstractmethod
    def insert(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: Hashable = None
    ) -> int:
        """Cache the whole pages of `token_ids`, whose K/V sit in `slots` ([len] int64),
        under `namespace`.

        The cache takes ownership of the slots of the newly cached tokens only.
        Returns:
            How many leading tokens were already cached: the caller still owns
            `slots[:that]` (beyond what it had matched before) and must free them,
            using the cache's slots from a fresh `match_prefix` instead.
        """

    @abstractmethod
    def lock(self, node: Any) -> None:
        """Protect `node` and its ancestors from eviction (reference counted)."""

    @abstractmethod
    def unlock(self, node: Any) -> None:
        """Release one `lock` on `node`; at count zero it becomes evictable again."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots back to the pool if possible, evicting the
        least recently used unlocked leaves first. Returns the number of slots freed."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens not protected by any lock (what `evict` could free)."""

    @property
    @abstractmethod
    def cached_size(self) -> int:
        """All tokens held by the cache."""

    def page_floor(self, n: int) -> int:
        """`n` rounded down to a whole number of pages."""
        return n - n % self.page_size


_EMPTY = torch.empty(0, dtype=torch.int64)


class NoPrefixCache(BasePrefixCache):
    """The cache switched off: nothing matches, nothing is kept (callers own every slot)."""

    def match_prefix(self, token_ids: Sequence[int], namespace: Hashable = None) -> MatchResult:
        return MatchResult(0, _EMPTY)

    def insert(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: Hashable = None
    ) -> int:
        return 0

    def lock(self, node: Any) -> None:
        return None

    def unlock(self, node: Any) -> None:
        return None

    def evict(self, num_tokens: int) -> int:
        return 0

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def cached_size(self) -> int:
        return 0


_REGISTRY: dict[str, Callable[..., BasePrefixCache]] = {}


def register_prefix_cache(name: str) -> Callable[[type], type]:
    """Class decorator adding a prefix-cache implementation under `name`."""

    def wrap(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return wrap


register_prefix_cache("none")(NoPrefixCache)


def create_prefix_cache(name: str, pool: KVPool, page_size: int = 1) -> BasePrefixCache:
    """Build the prefix cache registered as `name` ("radix" or "none")."""
    import llmql.engine.kvcache.radix_cache  # noqa: F401  (registers "radix")

    if name not in _REGISTRY:
        raise ValueError(f"unknown prefix cache {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](pool, page_size)
