"""Radix prefix cache on tiny data: match, insert, split, lock, evict; page sizes 1 and 4."""

from __future__ import annotations

import pytest
import torch

from llmql.engine.kvcache.base import NoPrefixCache, create_prefix_cache
from llmql.engine.kvcache.pool import KVPool
from llmql.engine.kvcache.radix_cache import RadixPrefixCache


def _pool(n: int = 64) -> KVPool:
    return KVPool(n, num_layers=1, num_kv_heads=1, head_dim=2)


def _insert(cache: RadixPrefixCache, ids: list[int]) -> tuple[int, torch.Tensor]:
    slots = cache.pool.alloc(len(ids))
    assert slots is not None
    existing = cache.insert(ids, slots)
    kept = cache.page_floor(len(ids))
    cache.pool.free(slots[:existing])  # duplicates stay with the caller
    cache.pool.free(slots[kept:])  # the partial page is never cached
    return existing, slots


def test_match_insert_split_page1() -> None:
    cache = RadixPrefixCache(_pool(), page_size=1)
    assert cache.match_prefix([1, 2, 3]).length == 0
    existing, slots = _insert(cache, [1, 2, 3, 4])
    assert existing == 0 and cache.cached_size == 4
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.length == 3 and m.slots.tolist() == slots[:3].tolist()
    # the match split the edge [1,2,3,4] into [1,2,3] + [4]
    assert len(cache.root.children) == 1 and len(m.node.children) == 1
    existing, _ = _insert(cache, [1, 2, 7, 8])
    assert existing == 2 and cache.cached_size == 6
    assert cache.match_prefix([1, 2, 7, 8, 9]).length == 4
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == slots.tolist()


def test_pages_truncate_and_split_on_page_boundary() -> None:
    cache = RadixPrefixCache(_pool(), page_size=4)
    existing, _ = _insert(cache, list(range(10)))  # 2 whole pages kept
    assert existing == 0 and cache.cached_size == 8
    assert cache.match_prefix(list(range(7))).length == 4
    assert cache.match_prefix(list(range(10))).length == 8
    # differs inside the second page: only the first page matches
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 7]).length == 4
    existing, _ = _insert(cache, [0, 1, 2, 3, 4, 5, 99, 7, 8])
    assert existing == 4 and cache.cached_size == 12
    assert cache.pool.free_slots == 64 - 12


def test_lock_protects_from_eviction_and_lru_order() -> None:
    pool = _pool(32)
    cache = RadixPrefixCache(pool, page_size=1)
    _insert(cache, [1, 2, 3])
    _insert(cache, [5, 6])
    _insert(cache, [1, 2, 9])  # splits [1,2,3] -> [1,2] + {[3], [9]}
    assert cache.evictable_size == 6 and pool.free_slots == 32 - 6
    m = cache.match_prefix([1, 2, 9])
    cache.lock(m.node)
    assert cache.evictable_size == 3  # [3] and [5,6]
    cache.match_prefix([5, 6])  # [5,6] now more recent than [3]
    assert cache.evict(1) == 1  # the LRU leaf [3]
    assert cache.match_prefix([1, 2, 3]).length == 2
    assert cache.evict(100) == 2  # only [5,6] is unlocked
    assert cache.match_prefix([1, 2, 9]).length == 3
    cache.unlock(m.node)
    assert cache.evictable_size == 3
    assert cache.evict(100) == 3 and cache.cached_size == 0 and pool.free_slots == 32


def test_split_keeps_lock_counts() -> None:
    cache = RadixPrefixCache(_pool(), page_size=2)
    _insert(cache, [1, 2, 3, 4, 5, 6])
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(m.node)
    cache.match_prefix([1, 2, 7, 7])  # split above the locked node
    assert cache.evictable_size == 0 and cache.evict(10) == 0
    cache.unlock(m.node)
    assert cache.evictable_size == 6 and cache.evict(10) == 6


def test_evict_cascades_to_parents() -> None:
    cache = RadixPrefixCache(_pool(), page_size=1)
    _insert(cache, [1, 2, 3])
    _insert(cache, [1, 2, 4])
    assert cache.evict(5) == 4 and not cache.root.children


def test_namespaces_are_apart_and_dropped_when_evicted() -> None:
    cache = RadixPrefixCache(_pool(), page_size=1)
    _insert(cache, [1, 2, 3])
    slots = cache.pool.alloc(3)
    assert cache.insert([1, 2, 3], slots, ("fp", "salt")) == 0  # nothing shared across namespaces
    assert cache.match_prefix([1, 2, 3], ("fp", "salt")).slots.tolist() == slots.tolist()
    assert cache.match_prefix([1, 2, 3], ("fp", "other")).length == 0
    assert cache.insert([], cache.pool.alloc(0), "unseen") == 0 and len(cache.roots) == 2
    assert cache.evict(6) == 6 and list(cache.roots) == [None]  # the base root stays
    assert cache.pool.free_slots == 64


def test_no_cache_and_registry() -> None:
    pool = _pool()
    assert isinstance(create_prefix_cache("radix", pool, 2), RadixPrefixCache)
    none = create_prefix_cache("none", pool)
    assert isinstance(none, NoPrefixCache)
    assert none.insert([1, 2], torch.tensor([0, 1])) == 0 and none.match_prefix([1, 2]).length == 0
    with pytest.raises(ValueError, match="unknown prefix cache"):
        create_prefix_cache("lru", pool)
    with pytest.raises(ValueError, match="page_size"):
        RadixPrefixCache(pool, page_size=0)


def test_random_against_trie_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    cache = RadixPrefixCache(_pool(4096), page_size=1)
    seqs: list[list[int]] = []
    for _ in range(50):
        base = seqs[torch.randint(len(seqs), (1,), generator=gen).item()] if seqs else []
        cut = int(torch.randint(len(base) + 1, (1,), generator=gen)) if base else 0
        tail = torch.randint(3, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        seq = base[:cut] + tail.tolist()
        best = max((_lcp(seq, s) for s in seqs), default=0)
        assert cache.match_prefix(seq).length == best
        _insert(cache, seq)
        seqs.append(seq)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_large_cpu_pool_is_zero_and_resident_only_where_used() -> None:
    """A 256 MiB pool costs the RSS of the slots written, and reads as zeros."""
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    before = rss_mib()
    pool = KVPool(65536, 4, 2, 64)  # 4 layers x 64k slots x 2 x 64 x 4 B, K and V: 256 MiB
    assert rss_mib() - before < 64
    assert not pool.k_buffer[3][-100:].any() and not pool.v_buffer[0][:100].any()
    pool.k_buffer[0][:1000] = 1.0
    assert pool.k_buffer[0][:1000].all() and not pool.k_buffer[1][:1000].any()
