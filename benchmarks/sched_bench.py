"""Scheduling benchmark: policies of the engine service side by side on real workloads
(movies.csv) with the default model.

(a) mixed lengths: long free-text answers (a paragraph, up to 128 tokens), one-sentence
    summaries, one-word answers and yes/no classifications, shuffled and submitted at once (after a warm-up of the same
    templates on other rows, so the length predictor has data; fcfs, which learns
    nothing, warms up on one row per template): fcfs vs ltr.
(b) fairness: a large llm_filter query starts on one DuckDB connection, a small llm()
    query on another connection 1 s later: fcfs vs fair (one tenant per query).
(c) two different queries on two connections at once vs one after the other (fair).

Prints one JSON line per policy and scenario, then the ratios. Usage:
    .venv/bin/python benchmarks/sched_bench.py [--quick] [--only a,b,c] [--mixed 48,16,8]
        [--mix 1,1,1,1] [--max-batch-tokens N] [--repeat N]
        [--long-tokens 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from sched_sim import StepLog, sjf_bound  # sibling script

TEMPLATES = [  # (instruction, max_tokens, choices, stop)
    ("Write a detailed paragraph about the movie and what the review says about it.", 128, None, ()),
    ("Summarise the review in one short sentence.", 48, None, ("\n",)),
    ("Name the genre of the movie in one word.", 48, None, ("\n",)),
    ("Is the review positive?", 8, ("yes", "no"), ()),
]


def data_dir() -> Path:
    """LLMQL_DATA_DIR, else the nearest `shared/data` above this checkout."""
    env = os.environ.get("LLMQL_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    return next((p / "shared" / "data" for p in here.parents if (p / "shared" / "data").is_dir()),
                here.parents[2] / "shared" / "data")


def movies() -> list[dict]:
    with open(data_dir() / "movies.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["review_content"]]


def _prompt(instruction: str, row: dict) -> str:
    return f"{instruction}\nmovie_title: {row['movie_title']}\nreview_content: {row['review_content']}\nAnswer:"


def mixed_requests(rows: list[dict], n: int, seed: int, mix: tuple[int, ...] = (1, 1, 1, 1)):
    """`n` requests, template t in proportion `mix[t]`; the k-th request of a template reads
    row k (with the even mix: each row under all four templates), then shuffled."""
    from llmql.engine.types import GenerationRequest

    pattern = [t for t, w in enumerate(mix) for _ in range(w)]
    out, used = [], [0] * len(TEMPLATES)
    for i in range(n):
        t = pattern[i % len(pattern)]
        instruction, max_tokens, choices, stop = TEMPLATES[t]
        out.append(GenerationRequest(_prompt(instruction, rows[used[t]]),
                                     max_tokens=max_tokens, choices=choices, stop=stop))
        used[t] += 1
    random.Random(seed).shuffle(out)
    return out


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either list handled)."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    sa, sb = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    concord = float((sa * sb).sum())
    denom = float(np.sqrt(np.abs(sa).sum() * np.abs(sb).sum()))
    return concord / denom if denom else 0.0


BATCH_TOKENS = {"max_batch_tokens": 0}  # NOTE: --max-batch-tokens (0: the engine's default)


def _config(policy: str, **kw):
    from llmql.engine.engine import EngineConfig

    return EngineConfig(policy=policy, **BATCH_TOKENS, **kw)


def run_mixed(lm, policy: str, n: int, warmup: int, max_running: int,
              mix: tuple[int, ...] = (1, 1, 1, 1)) -> dict:
    from llmql.engine.engine import EmbeddedEngine

    rows = movies()
    engine = EmbeddedEngine(lm, _config(policy, max_running=max_running))
    history = getattr(engine.scheduler.policy, "history", None)
    # NOTE: a policy without a predictor needs no training data: one row per template warms
    # the model and the templates' cached prefixes as well
    warm_rows = warmup if history is not None else 1
    engine.generate(mixed_requests(rows[n:], warm_rows * sum(mix), seed=1, mix=mix))
    seen = len(history) if history is not None else 0
    requests = mixed_requests(rows, n, seed=0, mix=mix)
    log = StepLog(engine)
    done: list[float] = [0.0] * n
    t0 = time.perf_counter()
    futures: list[Future] = []
    for i, r in enumerate(requests):
        f = engine.submit(r)
        f.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter()))
        futures.append(f)
    results = [f.result() for f in futures]
    latencies = np.asarray(done) - t0
    out = {"scenario": "mixed", "policy": policy, "rows": n, "max_running": max_running,
           "batch_tokens": engine.config.batch_tokens, "mix": list(mix),
           "warmup_rows": warm_rows,
           "mean_latency_s": round(float(latencies.mean()), 3),
           "p90_latency_s": round(float(np.percentile(latencies, 90)), 3),
           "throughput_rows_s": round(n / float(latencies.max()), 3),
           "output_tokens": sum(r.output_tokens for r in results),
           "errors": sum(r.finish_reason == "error" for r in results),
           "mean_output_tokens_by_template": _by_template(requests, results)}
    out.update(steps=len(log.steps), step_tokens=sum(t for t, _, _ in log.steps),
               step_rows_sampled=sum(r for _, r, _ in log.steps),
               step_seconds=round(sum(sec for _, _, sec in log.steps), 2))
    if policy == "fcfs":  # NOTE: what an oracle shortest-first order could reach on this run
        out.update(sjf_bound([r.prompt_tokens - r.cached_tokens for r in results],
                             [r.output_tokens for r in results], max_running=max_running,
                             budget=engine.config.batch_tokens, steps=log.steps))
    if history is not None:
        pairs = list(history)[seen:]
        out["kendall_tau"] = round(kendall_tau([p for p, _ in pairs], [a for _, a in pairs]), 3)
        out["predicted_requests"] = len(pairs)
    engine.close()
    return out


def _by_template(requests, results) -> list[float]:
    lengths: dict[int, list[int]] = {}
    for req, res in zip(requests, results):
        t = next(i for i, tpl in enumerate(TEMPLATES) if req.prompt.startswith(tpl[0]))
        lengths.setdefault(t, []).append(res.output_tokens)
    return [round(float(np.mean(lengths[t])), 1) if t in lengths else 0.0 for t in range(len(TEMPLATES))]


def _connection(engine, table: str, rows: int, offset: int = 0):
    import llmql

    con = llmql.connect(engine=engine, result_cache=False)
    con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_csv_auto('{data_dir() / 'movies.csv'}') "
                f"WHERE review_content IS NOT NULL ORDER BY id LIMIT {rows} OFFSET {offset}")
    return con


BIG = "SELECT count(*) FROM big WHERE llm_filter('Is the review positive?', movie_title, review_content)"
SMALL = "SELECT llm('Name the genre of the movie in one word.', movie_title) FROM small"


def _timed_query(con, sql: str, out: dict, key: str, t0: float) -> None:
    start = time.perf_counter()
    rows = con.sql(sql).fetchall()
    out[key] = (start - t0, time.perf_counter() - t0, len(rows))


def run_fair(lm, policy: str, big: int, small: int, delay: float) -> dict:
    from llmql.engine.engine import EmbeddedEngine

    engine = EmbeddedEngine(lm, _config(policy))
    cons = {"big": _connection(engine, "big", big), "small": _connection(engine, "small", small, big)}
    times: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_timed_query, args=(cons["big"], BIG, times, "big", t0))]
    threads[0].start()
    time.sleep(delay)
    threads.append(threading.Thread(target=_timed_query, args=(cons["small"], SMALL, times, "small", t0)))
    threads[1].start()
    for t in threads:
        t.join()
    makespan = max(end for _, end, _ in times.values())
    durations = [end - start for start, end, _ in times.values()]
    engine.close()
    return {"scenario": "fairness", "policy": policy, "rows": big + small,
            "batch_tokens": engine.config.batch_tokens,
            "small_tenant_finish_s": round(times["small"][1] - times["small"][0], 3),
            "big_finish_s": round(times["big"][1], 3),
            "mean_latency_s": round(float(np.mean(durations)), 3),
            "p90_latency_s": round(float(np.max(durations)), 3),
            "throughput_rows_s": round((big + small) / makespan, 3)}


def run_concurrent(lm, rows: int, concurrent: bool) -> dict:
    from llmql.engine.engine import EmbeddedEngine

    engine = EmbeddedEngine(lm, _config("fair"))
    queries = [(_connection(engine, "big", rows), BIG),
               (_connection(engine, "small", rows, rows), SMALL)]
    times: dict = {}
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=_timed_query, args=(c, q, times, str(i), t0))
                   for i, (c, q) in enumerate(queries)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, (c, q) in enumerate(queries):
            _timed_query(c, q, times, str(i), t0)
    makespan = max(end for _, end, _ in times.values())
    durations = [end - start for start, end, _ in times.values()]
    engine.close()
    return {"scenario": "two_queries", "policy": "fair",
            "mode": "concurrent" if concurrent else "sequential", "rows": 2 * rows,
            "batch_tokens": engine.config.batch_tokens,
            "mean_latency_s": round(float(np.mean(durations)), 3),
            "p90_latency_s": round(float(np.max(durations)), 3),
            "throughput_rows_s": round(2 * rows / makespan, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--only", default="a,b,c", help="scenarios to run (a,b,c)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--mixed", default="", help="scenario (a) as rows,warmup,max_running "
                        "(default 240,20,32; --quick 96,16,16)")
    parser.add_argument("--mix", default="1,1,1,1", help="scenario (a): weights of the "
                        "templates (paragraph, sentence, one word, yes/no)")
    parser.add_argument("--long-tokens", type=int, default=128,
                        help="scenario (a): max_tokens of the paragraph template (runs 1-3: 48)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="(a) and (c): run each side this many times, alternating which "
                        "goes first (ABBA...), and report the median of each figure")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="tokens per engine step (0: the engine's default for the device)")
    args = parser.parse_args()
    import torch

    from llmql.engine.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    BATCH_TOKENS["max_batch_tokens"] = args.max_batch_tokens
    TEMPLATES[0] = (*TEMPLATES[0][:1], args.long_tokens, *TEMPLATES[0][2:])
    lm = load_model()
    only = set(args.only.split(","))
    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    if "a" in only:
        n, warmup, running = (96, 16, 16) if args.quick else (240, 20, 32)
        if args.mixed:
            n, warmup, running = map(int, args.mixed.split(","))
        mix = tuple(int(w) for w in args.mix.split(","))
        sides = alternate(("fcfs", "ltr"), args.repeat,
                          lambda policy: run_mixed(lm, policy, n, warmup, running, mix))
        for policy in ("fcfs", "ltr"):
            emit(median_line(sides[policy]))
    if "b" in only:
        big, small = (160, 12) if args.quick else (400, 20)
        for policy in ("fcfs", "fair"):
            emit(run_fair(lm, policy, big, small, delay=1.0))
    if "c" in only:
        rows = 40 if args.quick else 100
        sides = alternate((False, True), args.repeat, lambda conc: run_concurrent(lm, rows, conc))
        for concurrent in (False, True):
            emit(median_line(sides[concurrent]))
    emit(ratios(lines))


def alternate(sides: tuple, repeat: int, run) -> dict:
    """`run(side)` for each side, `repeat` rounds, the order reversed every other round (so
    neither side always runs first, on a warmer process or a quieter box)."""
    out: dict = {side: [] for side in sides}
    for k in range(max(repeat, 1)):
        for side in (sides if k % 2 == 0 else sides[::-1]):
            out[side].append(run(side))
    return out


def median_line(runs: list[dict]) -> dict:
    """One line for several runs of a side: the median of each timing figure, every run's
    mean latency and throughput listed."""
    line = dict(runs[0])
    if len(runs) > 1:
        for key in ("mean_latency_s", "p90_latency_s", "throughput_rows_s", "kendall_tau",
                    "sim_oracle_sjf_x_fcfs"):
            if key in line:
                line[key] = round(float(np.median([r[key] for r in runs])), 3)
        line["runs_mean_latency_s"] = [r["mean_latency_s"] for r in runs]
        line["runs_throughput_rows_s"] = [r["throughput_rows_s"] for r in runs]
    return line


def ratios(lines: list[dict]) -> dict:
    """The side-by-side ratios the issue's targets are stated in."""
    by = {(d["scenario"], d["policy"], d.get("mode")): d for d in lines}
    out: dict = {"scenario": "ratios"}
    fcfs, ltr = by.get(("mixed", "fcfs", None)), by.get(("mixed", "ltr", None))
    if fcfs and ltr:
        out["mixed_ltr_latency_x_fcfs"] = round(ltr["mean_latency_s"] / fcfs["mean_latency_s"], 3)
        out["mixed_ltr_throughput_x_fcfs"] = round(ltr["throughput_rows_s"] / fcfs["throughput_rows_s"], 3)
        out["mixed_ltr_kendall_tau"] = ltr.get("kendall_tau")
        out["mixed_oracle_sjf_x_fcfs_simulated"] = fcfs.get("sim_oracle_sjf_x_fcfs")
    f_fcfs, f_fair = by.get(("fairness", "fcfs", None)), by.get(("fairness", "fair", None))
    if f_fcfs and f_fair:
        out["fair_small_finish_speedup"] = round(
            f_fcfs["small_tenant_finish_s"] / f_fair["small_tenant_finish_s"], 3)
        out["fair_throughput_x_fcfs"] = round(f_fair["throughput_rows_s"] / f_fcfs["throughput_rows_s"], 3)
    seq, conc = by.get(("two_queries", "fair", "sequential")), by.get(("two_queries", "fair", "concurrent"))
    if seq and conc:
        out["concurrent_throughput_x_sequential"] = round(
            conc["throughput_rows_s"] / seq["throughput_rows_s"], 3)
    return out


if __name__ == "__main__":
    main()
