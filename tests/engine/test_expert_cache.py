"""The expert cache's contract (pinning, byte budget, prefetch counters) and the backing
store's load errors for truncated or corrupt expert tensors."""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmql.engine.models import load_model
from llmql.engine.moe import ExpertCache
from llmql.engine.moe.store import _read_header

ITEM = 100


def _cache(budget_items: int, delay: float = 0.0, **kw) -> tuple[ExpertCache, list]:
    loads: list = []

    def load(key, out):
        loads.append(key)
        time.sleep(delay)
        return torch.full((2,), float(hash(key) % 1000))

    return ExpertCache(load, ITEM, budget_items * ITEM, **kw), loads


def test_pinned_expert_is_never_evicted() -> None:
    cache, _ = _cache(2)
    a = cache.acquire("a")
    cache.acquire("b")
    cache.release("b")
    cache.acquire("c")  # NOTE: room for c must come from b, the only unpinned entry
    assert cache.contains("a") and not cache.contains("b") and cache.contains("c")
    assert torch.equal(cache.acquire_pinned("a"), a)
    cache.release("c")
    cache.prefetch(["d", "e"])  # NOTE: one slot is free of pins (c); a stays
    time.sleep(0.05)
    assert cache.contains("a") and cache.resident_bytes <= cache.budget_bytes


def test_budget_and_pins_hold_under_concurrent_prefetch() -> None:
    """Random acquires with a slow background prefetcher: pinned entries stay, bytes <= budget."""
    cache, _ = _cache(4, delay=0.001, half_life=8.0)
    rng = random.Random(0)
    for _ in range(300):
        keys = rng.sample(range(12), 2)
        for key in keys:
            cache.acquire(key)
        cache.prefetch(rng.sample(range(12), 3))
        assert all(cache.contains(k) for k in keys)  # NOTE: in use -> resident
        assert cache.resident_bytes <= cache.budget_bytes
        for key in keys:
            cache.release(key)
    cache.close()
    stats = cache.snapshot()
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    assert stats["evictions"] > 0 and stats["prefetch_loads"] > 0
    assert stats["hits"] + stats["misses"] == 600


def test_prefetch_hits_and_accuracy_are_counted() -> None:
    cache, loads = _cache(4, delay=0.01)
    for future in cache.prefetch(["x", "y"]):
        future.result()
    cache.acquire("x")  # NOTE: served by the prefetch, no second load
    cache.release("x")
    cache.acquire("z")
    cache.release("z")
    cache.record_prediction({"x", "y"}, {"x", "z"})
    stats = cache.snapshot()
    assert loads.count("x") == 1
    assert (stats["hits"], stats["misses"], stats["prefetch_hits"]) == (1, 1, 1)
    assert stats["prefetch_accuracy"] == 0.5 and stats["bytes_moved"] == 3 * ITEM


def test_waits_for_a_prefetch_in_flight() -> None:
    cache, loads = _cache(2, delay=0.1)
    cache.prefetch(["slow"])
    value = cache.acquire("slow")  # NOTE: joins the load in flight instead of loading again
    assert loads == ["slow"] and value is not None and cache.snapshot()["prefetch_hits"] == 1


def test_on_demand_mode_keeps_nothing() -> None:
    cache, loads = _cache(0)
    cache.acquire("a")
    cache.release("a")
    cache.acquire("a")
    assert loads == ["a", "a"] and cache.resident_bytes == 0 and cache.prefetch(["b"]) == []


def test_budget_smaller_than_one_expert_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no expert"):
        ExpertCache(lambda k: k, ITEM, ITEM // 2)


def test_acquire_blocks_until_a_pin_is_released() -> None:
    cache, _ = _cache(1)
    cache.acquire("a")
    got = []
    thread = threading.Thread(target=lambda: got.append(cache.acquire("b")))
    thread.start()
    time.sleep(0.05)
    assert not got and cache.contains("a")  # NOTE: "a" is in use: b waits, a stays
    cache.release("a")
    thread.join(timeout=5)
    assert got and not cache.contains("a")


def _copy(directory, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(directory, out)
    return out


def test_truncated_expert_file_is_a_clear_load_error(tiny_model_dir, tmp_path) -> None:
    out = _copy(tiny_model_dir("mixtral"), tmp_path)
    path = out / "model.safetensors"
    header, start = _read_header(path, path.stat().st_size)
    cut = max(start + m["data_offsets"][0] for n, m in header.items() if ".experts." in n)
    path.write_bytes(path.read_bytes()[:cut + 100])  # NOTE: the last expert tensor is cut short
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(out), expert_cache_gib=0.01)


def test_corrupt_expert_shape_is_a_clear_load_error(tiny_model_dir, tmp_path) -> None:
    out = _copy(tiny_model_dir("qwen3_moe"), tmp_path)
    path = out / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"experts\.3\.down_proj.*shape"):
        load_model(str(out), expert_cache_gib=0.01)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(str(out))  # NOTE: the resident path refuses it too


def test_store_reads_experts_exactly_converts_dtype_and_reports_short_reads(tiny_model_dir, tmp_path) -> None:
    """Every expert read equals its checkpoint tensors (also with the page cache dropped after
    each read, and from a bfloat16 file into float32); a file cut short after loading gives
    a clear error instead of garbage."""
    from llmql.engine.loader import read_config
    from llmql.engine.moe import ExpertStore

    out = _copy(tiny_model_dir("mixtral"), tmp_path)
    path = out / "model.safetensors"
    tensors = load_file(path)
    config = read_config(out)

    def want(layer: int, e: int, dtype=torch.float32):
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        get = lambda n: tensors[p + n].to(dtype).float()  # noqa: E731
        return torch.cat([get("w1.weight"), get("w3.weight")]), get("w2.weight")

    store = ExpertStore(out, config, torch.float32)
    for drop in (False, True):
        store.drop_page_cache = drop
        for layer, e in [(0, 0), (1, 5), (2, 7)]:
            for got, ref in zip(store.load(layer, e), want(layer, e)):
                assert torch.equal(got, ref)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, path)
    bf16 = ExpertStore(out, config, torch.float32)
    for got, ref in zip(bf16.load(2, 3), want(2, 3, torch.bfloat16)):
        assert got.dtype == torch.float32 and torch.equal(got, ref)
    header, start = _read_header(path, path.stat().st_size)
    name = "model.layers.2.block_sparse_moe.experts.7.w2.weight"
    with open(path, "r+b") as f:
        f.truncate(start + header[name]["data_offsets"][0] + 10)
    with pytest.raises(ValueError, match="could not be read"):
        bf16.load(2, 7)


def test_cyclic_groups_keep_the_next_layers_experts() -> None:
    """Layers visited in a cycle: room for a miss comes from the layer used longest from now,
    not from the least recently used one (the layer visited next: what LRU would evict)."""
    cache, _ = _cache(2, groups=3)
    for layer in range(3):
        cache.begin(layer)
        cache.acquire((layer, 0))  # NOTE: at layer 2, (0, 0) is needed next, (1, 0) after it
        cache.release((layer, 0))
    assert cache.contains((0, 0)) and not cache.contains((1, 0)) and cache.contains((2, 0))
    assert cache.snapshot()["evictions"] == 1


def test_started_loads_are_pinned_misses_within_budget() -> None:
    cache, loads = _cache(3, delay=0.01, groups=2)
    cache.begin(0)
    cache.acquire((0, 0))  # NOTE: pinned: start_loads may not evict it
    started = cache.start_loads([(0, 1), (0, 2), (0, 3)])
    assert started == [(0, 1), (0, 2)]  # NOTE: no room for a third without evicting a pin
    assert cache.resident_bytes <= cache.budget_bytes
    values = [cache.acquire_pinned(k) for k in started]
    assert all(v is not None for v in values) and sorted(loads) == [(0, 0), (0, 1), (0, 2)]
    for key in [(0, 0), *started]:
        cache.release(key)
    cache.acquire((0, 3))  # NOTE: now there is room (unpinned entries to evict)
    stats = cache.snapshot()
    assert (stats["misses"], stats["hits"]) == (4, 0) and stats["peak_resident_bytes"] <= 3 * ITEM
    assert _cache(0)[0].start_loads([(0, 1)]) == []  # NOTE: on-demand mode: the caller loads


def test_queued_loads_are_advised_in_queue_order(tiny_model_dir, tmp_path) -> None:
    """start_loads and prefetch give the backing tier a read-ahead hint per queued load (misses
    first), none for synchronous misses; the store's hint leaves the expert's bytes intact."""
    advised: list = []
    cache = ExpertCache(lambda key, out: torch.zeros(2), ITEM, 4 * ITEM, groups=2, advise=advised.append)
    cache.begin(0)
    cache.acquire((0, 0))
    started = cache.start_loads([(0, 1), (0, 0)])
    cache.prefetch([(1, 2), (1, 3), (1, 4)])  # NOTE: room for two more only
    assert started == [(0, 1)] and advised == [(0, 1), (1, 2), (1, 3)]
    cache.acquire_pinned((0, 1))
    for key in [(0, 0), (0, 1)]:
        cache.release(key)
    cache.close()

    from llmql.engine.loader import read_config
    from llmql.engine.moe import ExpertStore

    out = _copy(tiny_model_dir("mixtral"), tmp_path)
    store = ExpertStore(out, read_config(out), torch.float32)
    before = store.load(1, 2)
    store.will_need(1, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, store.load(1, 2)))
