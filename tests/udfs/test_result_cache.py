"""The persistent result cache: keys, persistence, concurrent writer processes."""

from __future__ import annotations

import multiprocessing as mp

from llmql.settings import override
from llmql.udfs.prompts import cache_key
from llmql.udfs.result_cache import ResultCache, default_cache


def test_key_ignores_field_order_but_not_values():
    a = cache_key("m", {"f": "llm"}, {"x": 1, "y": "b"})
    assert a == cache_key("m", {"f": "llm"}, {"y": "b", "x": 1})
    assert a != cache_key("m", {"f": "llm"}, {"x": 2, "y": "b"})
    assert a != cache_key("other", {"f": "llm"}, {"x": 1, "y": "b"})


def test_persists_across_instances(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultCache(path).put_many({"k1": "v1", "k2": "v2"})
    assert ResultCache(path).get_many(["k1", "k3"]) == {"k1": "v1"}


def test_default_cache_follows_settings(tmp_path):
    with override(cache_dir=tmp_path, result_cache=False):
        assert default_cache() is None
    with override(cache_dir=tmp_path, result_cache=True):
        assert default_cache().path == tmp_path / "results.sqlite"


def _writer(path: str, worker: int) -> None:
    cache = ResultCache(path)
    for i in range(50):
        cache.put_many({f"{worker}-{i}": "x", "shared": str(worker)})


def test_concurrent_processes(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ResultCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(ResultCache(path)) == 151
