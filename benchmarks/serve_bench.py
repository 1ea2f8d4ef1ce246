"""`llmql serve` benchmark: closed-loop load, and one LLM SQL query remote vs embedded.

1. load: `--clients` threads each send completions to a real `llmql serve` (127.0.0.1,
   uvicorn in this process) back to back for `--seconds`: requests/s, p50/p99 latency,
   errors (must be 0), and the server's prefix-cache hit rate.
2. sql: one llm_filter query over `--rows` movie reviews, with a fresh engine per mode:
     embedded       `llmql.connect(engine=<embedded>)`
     remote         `llmql.connect(model="http://127.0.0.1:PORT/v1")` against llmql serve
     remote_orig    the same prompts through the remote backend in table order, fields as
                    written (no dedup, no reordering): what the optimizer's order buys
                    on a server's prefix cache.
   Reports wall time, prompt/cached tokens as the server counted them, and answers equal.

Prints one JSON line per measurement, then a short table. CPU timings are noisy.
Usage: PYTHONPATH=. python benchmarks/serve_bench.py [--clients 32] [--seconds 60] [--rows 64]
The model is loaded once; each measurement gets a fresh engine (empty prefix cache) on it.
Data: LLMQL_DATA_DIR or ../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb

import llmql
from llmql.engine import load
from llmql.engine.engine import EmbeddedEngine, EngineConfig
from llmql.engine.models import LoadedModel, load_model
from llmql.engine.server import ServerConfig, create_app
from llmql.engine.serving import running
from llmql.engine.types import GenerationRequest
from llmql.settings import override
from llmql.udfs.call import CallSpec
from llmql.udfs.functions import get_spec, max_tokens
from llmql.udfs.prompts import render_prompt
from llmql.udfs.types import CallOptions

DATA = Path(os.environ.get("LLMQL_DATA_DIR")
            or Path(__file__).resolve().parents[2] / "shared" / "data")
KIDS = "Is this movie suitable for kids?"
SQL = f"SELECT movie_title FROM movies WHERE llm_filter('{KIDS}', movie_info, review_content)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--model", default=None)
    parser.add_argument("--kv-tokens", type=int, default=16384, help="KV pool per engine")
    args = parser.parse_args()
    lm = load_model(args.model)
    results = [_load_test(args, lm, _movies(args.rows)), *_sql_modes(args, lm)]
    _table(results)


def _engine(args: argparse.Namespace, lm: LoadedModel) -> EmbeddedEngine:
    """A fresh engine (empty prefix cache) over the already loaded weights."""
    return EmbeddedEngine(lm, EngineConfig(kv_tokens=args.kv_tokens), model_name=lm.name)


def _emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def _movies(rows: int) -> list[dict]:
    con = duckdb.connect()
    frame = con.execute("SELECT movie_title, movie_info, review_content FROM read_csv_auto(?) "
                        "LIMIT ?", [str(DATA / "movies.csv"), rows]).df()
    return frame.to_dict("records")


def _load_test(args: argparse.Namespace, lm: LoadedModel, movies: list[dict]) -> dict:
    import openai

    engine = _engine(args, lm)
    prompts = [f"{KIDS}\nmovie_title: {m['movie_title']}\nreview: {m['review_content']}\nAnswer:"
               for m in movies]
    latencies: list[float] = []
    errors: Counter[str] = Counter()  # exception type (and HTTP status) -> count
    lock = threading.Lock()
    with running(create_app(engine, ServerConfig(max_queue=4 * args.clients))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        deadline = time.perf_counter() + args.seconds

        def worker(index: int) -> None:
            i = index
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    client.completions.create(model=_name(engine),
                                              prompt=prompts[i % len(prompts)],
                                              max_tokens=args.max_tokens, temperature=0)
                except openai.OpenAIError as exc:
                    with lock:
                        errors[f"{type(exc).__name__} {getattr(exc, 'status_code', '')}".strip()] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                i += args.clients

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    stats = engine.stats()
    engine.close()
    latencies.sort()
    return _emit({"bench": "load", "clients": args.clients, "seconds": round(elapsed, 1),
            "requests": len(latencies), "req_per_s": round(len(latencies) / elapsed, 2),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "prefix_hit_rate": round(stats.cache_hit_rate, 3)})


def _sql_modes(args: argparse.Namespace, lm: LoadedModel) -> list[dict]:
    out, answers = [], {}
    for mode in ("embedded", "remote", "remote_orig"):
        engine = _engine(args, lm)
        with override(progress=False), running(create_app(engine)) as url:
            t0 = time.perf_counter()
            answers[mode] = _run_mode(mode, engine, url, args.rows)
            elapsed = time.perf_counter() - t0
        stats = engine.stats()
        engine.close()
        out.append({"bench": "sql", "mode": mode, "rows": args.rows, "seconds": round(elapsed, 2),
                    "requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
                    "cached_tokens": stats.cached_tokens,
                    "prefix_hit_rate": round(stats.cache_hit_rate, 3)})
    base = out[0]["seconds"]
    for r in out:
        r["vs_embedded"] = round(r["seconds"] / base, 2)
    out[1]["same_answers_as_embedded"] = answers["remote"] == answers["embedded"]
    return [_emit(r) for r in out]


def _run_mode(mode: str, engine, url: str, rows: int) -> list:
    if mode == "remote_orig":
        return _original_order(url, rows)
    target = {"engine": engine} if mode == "embedded" else {"model": f"{url}/v1"}
    with llmql.connect(result_cache=False, **target) as con:
        con.execute("CREATE TABLE movies AS SELECT * FROM read_csv_auto(?) LIMIT ?",
                    [str(DATA / "movies.csv"), rows])
        return sorted(con.sql(SQL).fetchall())


def _original_order(url: str, rows: int) -> list:
    """Every row's llm_filter prompt in table order, fields as written, via the remote backend."""
    spec = CallSpec("llm_filter", KIDS, ("movie_info", "review_content"), CallOptions())
    fn = get_spec(spec.function)
    table = duckdb.connect().execute(
        "SELECT movie_info, review_content FROM read_csv_auto(?) LIMIT ?",
        [str(DATA / "movies.csv"), rows]).df().to_dict("records")
    requests = [GenerationRequest(render_prompt(spec, row, spec.fields), max_tokens=max_tokens(spec),
                                  choices=fn.choices(spec.options), stop=fn.stop) for row in table]
    remote = load(f"{url}/v1")
    texts = [r.text for r in remote.generate(requests)]
    remote.close()
    return texts


def _name(engine) -> str:
    return getattr(getattr(engine, "lm", None), "name", None) or engine.model_name


def _table(results: list[dict]) -> None:
    print(f"\n{'bench':6} {'mode':12} {'seconds':>8} {'req/s':>7} {'p50':>6} {'p99':>6} "
          f"{'hit':>5} {'x emb':>6}")
    for r in results:
        print(f"{r['bench']:6} {r.get('mode', ''):12} {r['seconds']:>8} {r.get('req_per_s', ''):>7} "
              f"{r.get('p50_s', ''):>6} {r.get('p99_s', ''):>6} {r['prefix_hit_rate']:>5} "
              f"{r.get('vs_embedded', ''):>6}")


if __name__ == "__main__":
    main()
