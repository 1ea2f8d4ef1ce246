"""Shared helpers for the Spark tests: a deterministic picklable fake engine, the movies slice.

Imported by the `test_spark*.py` modules (pytest puts this folder on sys.path). The fake
engine only exercises plumbing; equivalence tests use the real default model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from llmql.engine.types import EngineStats, GenerationRequest, GenerationResult

# NOTE: the first 200 rows of the team's movies.csv, kept in the repo so tests run anywhere.
DATA_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="session")
def spark():
    """One local[2,2] session for every Spark test module (two attempts per task, so the
    retry test can kill a worker); `movies` holds 12 rows, `movies40` 40."""
    import llmql.spark

    ship_by_value()
    session = llmql.spark.local_session("local[2,2]")
    session.createDataFrame(movies(12)).createOrReplaceTempView("movies")
    session.createDataFrame(movies(40)).createOrReplaceTempView("movies40")
    yield session
    llmql.spark.use_engine(None)
    session.stop()


def movies(rows: int = 12) -> pd.DataFrame:
    """The first `rows` rows of movies.csv (repeated movie_info, one NULL review)."""
    return pd.read_csv(DATA_DIR / "movies.csv", nrows=rows)


def fake_answer(request: GenerationRequest) -> str:
    """Deterministic answer: a choice picked by the hash of the prompt's lines, else an echo.

    NOTE: the lines are sorted, so the answer does not depend on the field order the
    reorderer chose for the row (which depends on the rest of the batch).
    """
    lines = sorted(str(request.prompt).split("\n"))
    digest = int(hashlib.sha256("\n".join(lines).encode()).hexdigest(), 16)
    if request.choices:
        return request.choices[digest % len(request.choices)]
    if request.json_schema:
        props = request.json_schema["properties"]
        return json.dumps({k: _FAKE_JSON.get(v.get("type"), "x") for k, v in props.items()})
    via = f" via {request.adapter}" if request.adapter else ""  # NOTE: shows the LoRA adapter
    return f"answer {digest % 1000}{via}"


_FAKE_JSON = {"integer": 1, "number": 1.5, "boolean": True}


class FakeEngine:
    """Answers by hashing the prompt; logs each prompt (one line) to `log_dir/<pid>.prompts`."""

    def __init__(self, log_dir: str, crash_after: int) -> None:
        self.log_dir = Path(log_dir)
        self.crash_after = crash_after
        self.answered = 0

    def generate(self, requests, *, progress=False):
        marker = self.log_dir / "crashed"
        if self.crash_after and self.answered >= self.crash_after and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(3)  # NOTE: a hard worker death, as an OOM kill would be
        with open(self.log_dir / f"{os.getpid()}.prompts", "a") as log:
            for r in requests:
                log.write(str(r.prompt).replace("\n", " | ") + "\n")
        self.answered += len(requests)
        return [GenerationResult(fake_answer(r), 10, 4, 1, "stop") for r in requests]

    def stats(self) -> EngineStats:
        return EngineStats(requests=self.answered)


@dataclass(frozen=True)
class FakeEngineFactory:
    """Picklable factory of `FakeEngine`s; each load is logged to `log_dir/<pid>.loads`."""

    log_dir: str
    crash_after: int = 0

    def __call__(self) -> FakeEngine:
        with open(Path(self.log_dir) / f"{os.getpid()}.loads", "a") as log:
            log.write("load\n")
        return FakeEngine(self.log_dir, self.crash_after)


def logged(log_dir: Path, suffix: str) -> list[str]:
    """Every line logged by any process under `log_dir` with that suffix."""
    return [line for p in Path(log_dir).glob(f"*.{suffix}") for line in p.read_text().splitlines()]


def ship_by_value() -> None:
    """Workers cannot import this test module: pickle its classes by value."""
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
