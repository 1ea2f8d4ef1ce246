"""The fast tier of expert offload: a byte-budgeted cache of experts, shared by every MoE layer.

Contract:
    acquire(key) -> expert   pins the expert (loading it on a miss) until release(key);
    release(key)             unpins it;
    start_loads(keys)        starts loading missing experts on the background thread, pinned
                             for the caller (who computes other experts meanwhile);
    prefetch(keys)           loads experts on the background thread, when room can be made
                             without touching pinned entries.
Both call `advise(key)` (when given) for each load they queue, in queue order: the backing
tier's read-ahead hint, so the disk works on queued loads while the thread copies earlier ones.
Invariants: resident bytes (loaded or loading) never exceed the budget; a pinned or loading
entry is never evicted; eviction takes the unpinned entry with the lowest `score`: frequency
decayed by recency, divided by how far away its next use is.

With `groups` > 1, keys are (group, id) and the groups are visited in a cycle (the MoE layers
of one forward: `begin(layer)`). Recency then counts visits of the entry's own group, and an
entry of the group visited next scores higher than one of the group just left: in a cycle,
plain recency (LRU) evicts exactly the entries needed soonest. Budget 0 is naive on-demand
loading: every acquire loads, nothing is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

Key = Hashable


@dataclass
class _Entry:
    value: Any = None
    ready: threading.Event = field(default_factory=threading.Event)
    pins: int = 0
    freq: float = 0.0
    last_use: int = 0  # the clock of the entry's group at its last use
    group: int = 0
    prefetched: bool = False  # brought in by prefetch and not used yet


@dataclass
class CacheStats:
    """Counters of one expert cache (see `ExpertCache.stats`)."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # acquires served by an entry prefetch brought in
    prefetch_loads: int = 0
    prefetch_wasted: int = 0  # prefetched entries evicted before any use
    prefetch_predicted: int = 0  # experts predicted for a layer
    prefetch_correct: int = 0  # ... that the layer then used
    evictions: int = 0
    bytes_moved: int = 0  # bytes copied into the fast tier (misses + prefetches)
    peak_resident_bytes: int = 0
    cpu_computed: int = 0  # cold experts computed on the CPU instead (Fiddler, CUDA only)


class ExpertCache:
    """Byte-budgeted expert cache over `load(key, out) -> value` (the backing tier); `out` is an
    evicted value whose buffers may be reused, or None. `advise(key)`: see the module doc."""

    def __init__(self, load: Callable[[Key, Any], Any], item_bytes: int, budget_bytes: int,
                 *, half_life: float = 64.0, prefetch_thread: bool = True, groups: int = 1,
                 advise: Callable[[Key], None] | None = None) -> None:
        if budget_bytes and budget_bytes < item_bytes:
            raise ValueError(f"expert cache budget {budget_bytes} B holds no expert ({item_bytes} B each); "
                             "use 0 for on-demand loading or a larger budget")
        self._load, self.item_bytes, self.budget_bytes = load, item_bytes, budget_bytes
        self._advise = advise
        self.half_life, self.groups = half_life, groups
        self._entries: dict[Key, _Entry] = {}
        self._free: list[Any] = []  # NOTE: evicted values, reused as load buffers (no allocator churn)
        self._lock = threading.Condition()
        self._ticks = [0] * groups  # NOTE: visits of each group (one group: acquires)
        self._current = 0
        self.stats = CacheStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmql-experts") if (
            prefetch_thread and budget_bytes) else None

    @property
    def capacity(self) -> int:
        """How many experts fit in the budget."""
        return self.budget_bytes // self.item_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes held by loaded and loading entries."""
        return len(self._entries) * self.item_bytes

    def begin(self, group: int) -> None:
        """A visit of `group` starts (groups > 1): its entries' recency clock advances."""
        with self._lock:
            self._current = group
            self._ticks[group] += 1

    def contains(self, key: Key) -> bool:
        """Whether `key` is resident or being loaded."""
        with self._lock:
            return key in self._entries

    def acquire(self, key: Key) -> Any:
        """The expert `key`, pinned until `release(key)`; loads it (blocking) on a miss."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    return self._miss(key)
                self._touch(entry, hit=True)
            entry.ready.wait()
            if entry.value is not None:
                return entry.value
            # NOTE: the prefetch that was loading it failed; load it here (raises the error)

    def release(self, key: Key) -> None:
        """Unpin `key` (a no-op for on-demand loads that were never cached)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                self._lock.notify_all()

    def pin_if_resident(self, key: Key) -> bool:
        """Pin `key` when it is resident or loading (counts a hit); False otherwise."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._touch(entry, hit=True)
            return True

    def acquire_pinned(self, key: Key) -> Any:
        """The expert `key` already pinned by `pin_if_resident` (waits while it loads)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            entry.ready.wait()
            if entry.value is not None:
                return entry.value
        return self.acquire(key)  # NOTE: its prefetch failed and the entry (and pin) are gone

    def start_loads(self, keys: Iterable[Key]) -> list[Key]:
        """Start loading absent `keys` on the background thread, ahead of later prefetches,
        each pinned (and counted as a miss) as if acquired: wait with `acquire_pinned`, then
        `release`. Returns the keys started: those that fit without evicting pinned entries
        (none without a background thread); the caller `acquire`s the rest."""
        if self._pool is None:
            return []
        started = []
        with self._lock:
            for key in keys:
                if key in self._entries or not self._make_room(wait=False):
                    continue
                self.stats.misses += 1
                entry = _Entry(group=self._group(key))
                self._insert(key, entry)
                self._touch(entry, hit=False)
                self._pool.submit(self._fill, key, entry, False)
                started.append(key)
        self._advise_all(started)
        return started

    def prefetch(self, keys: Iterable[Key]) -> list[Future]:
        """Start loading absent `keys` in the background (those that fit without evicting
        pinned entries); returns their futures."""
        if self._pool is None:
            return []
        futures, queued = [], []
        with self._lock:
            for key in keys:
                if key in self._entries or not self._make_room(wait=False):
                    continue
                # NOTE: scored as one fresh use, so the current layer's misses evict older
                # entries before the prefetch they are overlapping with.
                entry = _Entry(pins=1, freq=1.0, prefetched=True, group=self._group(key))
                self._insert(key, entry)
                self.stats.prefetch_loads += 1
                futures.append(self._pool.submit(self._fill, key, entry, True))
                queued.append(key)
        self._advise_all(queued)
        return futures

    def record_prediction(self, predicted: set, actual: set) -> None:
        """Count how many predicted experts a layer then used (prefetch accuracy)."""
        with self._lock:
            self.stats.prefetch_predicted += len(predicted)
            self.stats.prefetch_correct += len(predicted & actual)

    def snapshot(self) -> dict[str, float]:
        """The counters plus derived rates, resident and budget bytes (JSON-ready)."""
        with self._lock:
            s = dict(vars(self.stats))
            s["resident_bytes"] = self.resident_bytes
            s["budget_bytes"] = self.budget_bytes
        lookups = s["hits"] + s["misses"]
        s["hit_rate"] = s["hits"] / lookups if lookups else 0.0
        s["prefetch_accuracy"] = (s["prefetch_correct"] / s["prefetch_predicted"]
                                  if s["prefetch_predicted"] else 0.0)
        return s

    def close(self) -> None:
        """Stop the prefetch thread (pending loads finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _advise_all(self, keys: list[Key]) -> None:
        """The read-ahead hints of queued loads (outside the lock: a hint may start I/O)."""
        if self._advise is not None:
            for key in keys:
                self._advise(key)

    def _miss(self, key: Key) -> Any:
        """Load `key` synchronously (lock held on entry, released while loading)."""
        self.stats.misses += 1
        if not self.budget_bytes:
            self.stats.bytes_moved += self.item_bytes
            self._lock.release()
            try:
                return self._load(key, None)
            finally:
                self._lock.acquire()
        self._make_room(wait=True)
        entry = _Entry(group=self._group(key))
        self._insert(key, entry)
        self._touch(entry, hit=False)
        self._lock.release()
        try:
            self._fill(key, entry, False)
        finally:
            self._lock.acquire()
        return entry.value

    def _fill(self, key: Key, entry: _Entry, from_prefetch: bool) -> None:
        with self._lock:
            out = self._free.pop() if self._free else None
        try:
            entry.value = self._load(key, out)
        except BaseException:
            with self._lock:
                self._entries.pop(key, None)
                self._lock.notify_all()
            entry.ready.set()
            raise
        with self._lock:
            self.stats.bytes_moved += self.item_bytes
            if from_prefetch:
                entry.pins -= 1
            self._lock.notify_all()
        entry.ready.set()

    def _group(self, key: Key) -> int:
        return key[0] if self.groups > 1 else 0  # type: ignore[index]

    def _touch(self, entry: _Entry, hit: bool) -> None:
        if self.groups == 1:
            self._ticks[0] += 1
        entry.freq = self._frequency(entry) + 1.0
        entry.last_use = self._ticks[entry.group]
        entry.pins += 1
        if hit:
            self.stats.hits += 1
            if entry.prefetched:
                self.stats.prefetch_hits += 1
        entry.prefetched = False

    def _frequency(self, entry: _Entry) -> float:
        """Uses, halving every `half_life` ticks of the entry's group clock since the last."""
        return entry.freq * 0.5 ** ((self._ticks[entry.group] - entry.last_use) / self.half_life)

    def _score(self, entry: _Entry) -> float:
        """Expected reuse per unit of waiting: frequency over the number of group visits until
        the entry's group comes again (1 for the next group, `groups` for the current one)."""
        distance = (entry.group - self._current - 1) % self.groups + 1
        return self._frequency(entry) / distance

    def _insert(self, key: Key, entry: _Entry) -> None:
        entry.last_use = self._ticks[entry.group]
        self._entries[key] = entry
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)

    def _make_room(self, wait: bool) -> bool:
        """Evict until one more expert fits; with `wait`, block while every entry is pinned."""
        while self.resident_bytes + self.item_bytes > self.budget_bytes:
            victims = [(self._score(e), k) for k, e in self._entries.items() if e.pins == 0]
            if not victims:
                if not wait:
                    return False
                self._lock.wait()
                continue
            _, key = min(victims, key=lambda v: v[0])
            evicted = self._entries.pop(key)
            self._free.append(evicted.value)
            self.stats.evictions += 1
            self.stats.prefetch_wasted += evicted.prefetched
        return True
