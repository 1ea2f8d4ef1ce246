"""A query killed with SIGKILL mid-run resumes from the result cache: the rerun computes only
the prompts that had not finished (real subprocesses, real engine)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 10
SCRIPT = f"""
import json, sys
import llmql, llmql.udfs.executor as ex
from llmql.udfs.result_cache import ResultCache
cache = ResultCache(sys.argv[1])
ex.default_cache = lambda enabled=None: cache
con = llmql.connect(chunk_size=2)
con.execute("CREATE TABLE m AS SELECT * FROM read_csv_auto('examples/movies_sample.csv') LIMIT {ROWS}")
con.sql("SELECT llm_score('Rate the review from 1 to 5.', 1, 5, review_content) FROM m").fetchall()
print(json.dumps(con.last_report().total.to_dict()))
"""


def _cached(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _start(path: Path) -> subprocess.Popen:
    env = {**os.environ, "LLMQL_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_query_resumes_from_cache(tmp_path):
    path = tmp_path / "results.sqlite"
    proc = _start(path)
    deadline = time.time() + 240
    while _cached(path) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _cached(path)
    assert 2 <= done < ROWS

    rerun = _start(path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["cache_hits"] >= done
    # NOTE: +1 is the content-free prompt of the calibrated llm_score (never cached).
    computed = report["llm_calls"] - 1
    assert computed == report["distinct_inputs"] - report["cache_hits"]
    assert computed <= ROWS - done
    assert _cached(path) == report["distinct_inputs"]
