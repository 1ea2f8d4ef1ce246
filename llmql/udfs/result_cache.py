"""Persistent result cache: sqlite3 in WAL mode at `<cache_dir>/results.sqlite`.

Safe under concurrent processes (Spark workers, parallel queries): every write is one short
transaction, readers never block writers (WAL), and a busy database is waited on.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from llmql.settings import get_settings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_BATCH = 500
# NOTE: part of every key; bump it when prompts, parsing or key contents change meaning, so
# answers of an older llmql miss instead of being replayed.
CACHE_FORMAT_VERSION = 3  # NOTE: 3: written field order became the default


class ResultCache:
    """Model answers keyed by `prompts.cache_key`; stores the raw text, parsed on read."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        with self._con:
            self._con.execute(_SCHEMA)

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The cached texts of those `keys` that are present."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(unique), _BATCH):
                part = unique[i : i + _BATCH]
                marks = ",".join("?" * len(part))
                rows = self._con.execute(
                    f"SELECT key, text FROM results WHERE key IN ({marks})", part
                ).fetchall()
                found.update(rows)
        return found

    def put_many(
        self, items: Mapping[str, str] | Iterable[tuple[str, str]], finish: str = "stop"
    ) -> None:
        """Store answers in one transaction (committed before returning)."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        if not pairs:
            return
        now = time.time()
        with self._lock, self._con:
            self._con.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                [(k, t, finish, now) for k, t in pairs],
            )

    def __len__(self) -> int:
        with self._lock:
            return self._con.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def clear(self) -> None:
        """Forget every cached answer."""
        with self._lock, self._con:
            self._con.execute("DELETE FROM results")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._con.close()


_OPEN: dict[Path, ResultCache] = {}
_OPEN_LOCK = threading.Lock()


def default_cache(enabled: bool | None = None) -> ResultCache | None:
    """The process's cache at `<settings.cache_dir>/results.sqlite`, or None when disabled."""
    settings = get_settings()
    if not (settings.result_cache if enabled is None else enabled):
        return None
    path = Path(settings.cache_dir) / "results.sqlite"
    with _OPEN_LOCK:
        if path not in _OPEN:
            _OPEN[path] = ResultCache(path)
        return _OPEN[path]
