"""Radix-tree prefix cache over token ids, in pages (SGLang's RadixAttention cache)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from llmql.engine.kvcache.base import BasePrefixCache, MatchResult, register_prefix_cache
from llmql.engine.kvcache.pool import KVPool


class _Node:
    """A tree edge: `key` tokens (whole pages) whose K/V sit in `value` slots."""

    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: tuple[int, ...], value: torch.Tensor, parent: _Node | None) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.lock_ref = 0
        self.last_access = 0

    def __lt__(self, other: _Node) -> bool:
        return self.last_access < other.last_access


@register_prefix_cache("radix")
class RadixPrefixCache(BasePrefixCache):
    """Radix tree of cached token pages; LRU eviction of unlocked leaves.

    Children are keyed by their first page, so page_size=1 is a plain token radix tree.
    Each namespace (LoRA adapter, `cache_salt`) has its own root; `root` is the base
    model's. Other roots are dropped with their last entry, so one-off salts do not pile up.
    """

    def __init__(self, pool: KVPool, page_size: int = 1) -> None:
        super().__init__(pool, page_size)
        self.root = _new_root()
        self.roots: dict[Hashable, _Node] = {None: self.root}
        self._clock = itertools.count(1)
        self._evictable = 0
        self._protected = 0

    # -- lookups ------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], namespace: Hashable = None) -> MatchResult:
        key = tuple(token_ids[: self.page_floor(len(token_ids))])
        root = self.roots.get(namespace)
        if root is None:
            return MatchResult(0, torch.empty(0, dtype=torch.int64))
        node, pos, parts = root, 0, []
        now = next(self._clock)
        while pos < len(key):
            child = node.children.get(key[pos : pos + self.page_size])
            if child is None:
                break
            n = self._common_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            parts.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return MatchResult(pos, slots, node if node is not root else None)

    def insert(
        self, token_ids: Sequence[int], slots: torch.Tensor, namespace: Hashable = None
    ) -> int:
        n_total = self.page_floor(min(len(token_ids), slots.numel()))
        if n_total == 0:
            return 0
        key = tuple(token_ids[:n_total])
        node, pos = self.roots.setdefault(namespace, _new_root()), 0
        now = next(self._clock)
        while pos < n_total:
            child = node.children.get(key[pos : pos + self.page_size])
            if child is None:
                self._add_child(node, key[pos:], slots[pos:n_total].clone(), now)
                return pos
            n = self._common_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        return pos

    # -- locking ------------------------------------------------------------------------
    def lock(self, node: Any) -> None:
        while node is not None and node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Any) -> None:
        while node is not None and node.parent is not None:
            assert node.lock_ref > 0, "unlock() without a matching lock()"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    # -- eviction -----------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        heap = [n for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        self.roots = {ns: r for ns, r in self.roots.items() if r.children or r is self.root}
        return freed

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def cached_size(self) -> int:
        return self._evictable + self._protected

    # -- helpers ------------------------------------------------------------------------
    def _common_len(self, a: tuple[int, ...], key: tuple[int, ...], pos: int) -> int:
        """Tokens (whole pages) that `a` shares with `key[pos:]`."""
        n, limit, p = 0, min(len(a), len(key) - pos), self.page_size
        while n < limit and a[n : n + p] == key[pos + n : pos + n + p]:
            n += p
        return n

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child` after `n` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.key[:n], child.value[:n], parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        parent.children[child.key[: self.page_size]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[: self.page_size]] = child
        return upper

    def _add_child(self, node: _Node, key: tuple[int, ...], value: torch.Tensor, now: int) -> None:
        child = _Node(key, value, node)
        child.last_access = now
        node.children[key[: self.page_size]] = child
        self._evictable += len(key)

    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.roots.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None:
                out.append(node)
        return out


def _new_root() -> _Node:
    root = _Node((), torch.empty(0, dtype=torch.int64), None)
    root.lock_ref = 1  # NOTE: roots are never evicted
    return root

