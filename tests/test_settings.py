"""Settings: environment parsing, validation and the per-context overlay."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from llmql import settings as S


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    env = {
        "LLMQL_MODEL": "/models/x.gguf",
        "LLMQL_CACHE_DIR": str(tmp_path),
        "LLMQL_DEVICE": "CPU",
        "LLMQL_THREADS": "2",
        "LLMQL_KV_TOKENS": "4096",
        "LLMQL_KV_GIB": "0.5",
        "LLMQL_RESULT_CACHE": "0",
        "LLMQL_PROGRESS": "false",
    }
    s = S.Settings.from_env(env)
    assert s == S.Settings(
        model="/models/x.gguf", cache_dir=tmp_path, device="cpu", threads=2,
        kv_tokens=4096, kv_gib=0.5, result_cache=False, progress=False,
    )


def test_defaults_when_env_is_empty() -> None:
    s = S.Settings.from_env({})
    assert s.model == S.DEFAULT_MODEL and s.device == "auto" and s.result_cache
    assert s.cache_dir == Path.home() / ".cache" / "llmql"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("LLMQL_DEVICE", "tpu", "LLMQL_DEVICE"),
        ("LLMQL_THREADS", "many", "LLMQL_THREADS"),
        ("LLMQL_RESULT_CACHE", "maybe", "LLMQL_RESULT_CACHE"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.Settings.from_env({key: value})


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        S.Settings().model = "x"  # type: ignore[misc]


def test_override_is_scoped_and_thread_local() -> None:
    base = S.get_settings()
    seen: list[str] = []
    with S.override(model="inner") as inner:
        assert S.get_settings() is inner and inner.model == "inner"
        t = threading.Thread(target=lambda: seen.append(S.get_settings().model))
        t.start()
        t.join()
    assert S.get_settings() == base
    assert seen == [base.model]  # a new thread does not see this context's overlay


def test_resolved_device_on_this_machine() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert S.Settings(device="auto").resolved_device() == expected
    assert S.Settings(device="cpu").resolved_device() == "cpu"
