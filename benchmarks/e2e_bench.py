"""End-to-end benchmark on DuckDB: the paper's query types, three modes side by side.

Modes (result cache disabled in all):
  no_cache    every row's prompt, table order, argument field order; engine prefix cache off
  cache_orig  the same prompts and order, engine prefix cache on
  llmql       `llmql.connect()` with its defaults: plan, dedup, rows sorted (fields as
              written), prefix cache on
  llmql_fields  the same with `reorder_fields := true` (GGR row + per-row field order)

Prints one JSON line per (query, mode) and per query's speedups (headline: vs `cache_orig`, the
engine's prefix cache without llmql's planning and reordering), then a table. Wall time on
a shared CPU is noisy; `computed_tokens` (tokens the engine actually ran) is deterministic.
Usage: python benchmarks/e2e_bench.py [--scale 1.0] [--only filter_movies,...]
Data: LLMQL_DATA_DIR or ../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from llmql.connectors.duckdb import LLMConnection
from llmql.engine.types import GenerationRequest
from llmql.optimizer import plan
from llmql.udfs import CallSpec
from llmql.udfs.functions import get_spec, max_tokens
from llmql.udfs.prompts import render_prompt

DATA = Path(
    os.environ.get("LLMQL_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
KIDS = "Is this movie suitable for kids?"


@dataclass(frozen=True)
class Query:
    """A benchmark query; the baselines run the calls `plan(sql)` finds, filters first."""

    name: str
    table: str
    sql: str


SUMMARISE = "Summarise the review in a few words."
QUERIES = (
    Query(
        "filter_movies",
        "movies",
        f"SELECT movie_title FROM movies WHERE llm_filter('{KIDS}', review_content, movie_info)",
    ),
    Query(
        "filter_products",
        "products",
        "SELECT name FROM products WHERE llm_filter('Does the reviewer recommend the product?', "
        'name, categories, "reviews.text")',
    ),
    Query(  # supplementary: the same filter with the review written first (as filter_movies)
        "filter_products_review_first",
        "products",
        "SELECT name FROM products WHERE llm_filter('Does the reviewer recommend the product?', "
        '"reviews.text", name, categories)',
    ),
    Query(
        "projection",
        "movies",
        f"SELECT llm('{SUMMARISE}', review_content, movie_info, max_tokens := 4) FROM movies",
    ),
    Query(
        "multi_call",
        "movies",
        f"SELECT llm('{SUMMARISE}', review_content, movie_info, max_tokens := 4) FROM movies "
        f"WHERE llm_filter('{KIDS}', review_content, movie_info)",
    ),
    Query(
        "aggregation",
        "movies",
        "SELECT movie_title, AVG(llm_score('Rate the review from 1 to 5.', 1, 5, movie_info, "
        "review_content)) FROM movies GROUP BY movie_title",
    ),
    Query(
        "rag_squad",
        "squad",
        "SELECT llm('Answer the question from the context.', context, question, max_tokens := 4) "
        "FROM squad",
    ),
)


def baseline_calls(query: Query) -> list[CallSpec]:
    """The query's calls as the optimizer plans them (fields in argument order)."""
    return [c.spec() for c in plan(query.sql).calls]


# (file, group column, groups, rows per group) of each table's slice, then shuffled. Groups keep
# the data's natural size (movies: ~20 reviews per movie; squad: ~5 questions per context).
SLICES = {
    "movies": ("movies.csv", "movie_title", 2, 10),
    "products": ("products.csv", "name", 2, 10),
    "squad": ("squad.csv", "context", 3, 5),
}


def load_slice(con: duckdb.DuckDBPyConnection, table: str, scale: float) -> None:
    """A seeded sample: `groups` groups × `rows` rows, in random (not grouped) order."""
    file, key, groups, rows = SLICES[table]
    groups = max(1, round(groups * scale))  # NOTE: more groups, each of the data's natural size
    con.execute(
        "CREATE OR REPLACE TABLE __all AS SELECT * FROM read_csv_auto(?)", [str(DATA / file)]
    )
    picked = con.execute(
        f'SELECT "{key}" FROM __all {_not_null(table)} GROUP BY 1 HAVING count(*) >= ? ORDER BY 1',
        [rows],
    ).fetchall()
    chosen = [p[0] for p in random.Random(7).sample(picked, groups)]
    data = con.execute(
        f'SELECT * FROM __all WHERE "{key}" IN (SELECT unnest(?)) {_not_null(table, "AND")} '
        f'QUALIFY row_number() OVER (PARTITION BY "{key}" ORDER BY hash({_text(table)})) <= ?',
        [chosen, rows],
    ).to_arrow_table()

    order = list(range(data.num_rows))
    random.Random(11).shuffle(order)
    con.register("__slice", data.take(order))
    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM __slice")
    con.execute("DROP TABLE __all")


def _text(table: str) -> str:
    return {"movies": "review_content", "products": '"reviews.text"', "squad": "question"}[table]


def _not_null(table: str, word: str = "WHERE") -> str:
    return f"{word} {_text(table)} IS NOT NULL "


def run_baseline(engine, con, query: Query) -> dict:
    """Every row's prompt in table order (filter survivors feed later calls)."""
    rows = con.execute(f"SELECT * FROM {query.table}").to_arrow_table()
    rows = rows.to_pylist()
    stats0, t0, prompts = engine.stats(), time.perf_counter(), 0
    for spec in baseline_calls(query):
        fn = get_spec(spec.function)
        requests = [
            GenerationRequest(
                render_prompt(spec, r, spec.fields),
                max_tokens=max_tokens(spec),
                choices=fn.choices(spec.options),
                stop=fn.stop,
            )
            for r in rows
        ]
        results = []
        for i in range(0, len(requests), spec.options.chunk_size):
            results += engine.generate(requests[i : i + spec.options.chunk_size], progress=False)
        prompts += len(requests)
        if spec.function == "llm_filter":
            rows = [r for r, res in zip(rows, results) if res.text.strip().lower() == "yes"]
    return _measure(engine, stats0, t0, prompts)


def run_llmql(engine, con, query: Query, *, reorder_fields: bool = False) -> dict:
    """The query through `llmql.connect()` on the same data."""
    options = {"result_cache": False, "reorder_fields": reorder_fields}
    llm_con = LLMConnection(con, engine=engine, options=options)
    stats0, t0 = engine.stats(), time.perf_counter()
    llm_con.sql(query.sql).fetchall()
    return _measure(engine, stats0, t0, llm_con.last_report().total.llm_calls)


def _measure(engine, before, t0: float, prompts: int) -> dict:
    after = engine.stats()
    prompt = after.prompt_tokens - before.prompt_tokens
    cached = after.cached_tokens - before.cached_tokens
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "prompts": prompts,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": after.computed_tokens - before.computed_tokens,
        "prefix_hit_rate": round(cached / prompt, 3) if prompt else 0.0,
    }


def fresh_engine(base, prefix_cache: bool):
    """A new engine (empty KV cache) sharing `base`'s loaded weights."""
    from llmql.engine.engine import EmbeddedEngine

    return EmbeddedEngine(base.lm, dataclasses.replace(base.config, prefix_cache=prefix_cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=5.0, help="multiplier of the number of groups (rows per group stay natural)")
    parser.add_argument("--only", default="", help="comma-separated query names")
    args = parser.parse_args()
    from llmql.engine import load

    base = load()
    results = []
    for query in QUERIES:
        if args.only and query.name not in args.only.split(","):
            continue
        con = duckdb.connect()
        load_slice(con, query.table, args.scale)
        n = con.execute(f"SELECT count(*) FROM {query.table}").fetchone()[0]
        modes = {
            "no_cache": run_baseline(fresh_engine(base, False), con, query),
            "cache_orig": run_baseline(fresh_engine(base, True), con, query),
            "llmql": run_llmql(fresh_engine(base, True), con, query),
            "llmql_fields": run_llmql(fresh_engine(base, True), con, query, reorder_fields=True),
        }
        for mode, m in modes.items():
            print(json.dumps({"query": query.name, "mode": mode, "rows": n, **m}), flush=True)
        speed = {  # NOTE: the headline is vs cache_orig: what llmql adds to a prefix-caching engine
            "query": query.name,
            "rows": n,
            "speedup_vs_cache_orig": round(
                modes["cache_orig"]["seconds"] / modes["llmql"]["seconds"], 2
            ),
            "computed_ratio_vs_cache_orig": _ratio(modes, "cache_orig", "computed_tokens"),
            "speedup_vs_no_cache": round(
                modes["no_cache"]["seconds"] / modes["llmql"]["seconds"], 2
            ),
            "computed_ratio_vs_no_cache": _ratio(modes, "no_cache", "computed_tokens"),
            "fields_speedup_vs_cache_orig": round(
                modes["cache_orig"]["seconds"] / modes["llmql_fields"]["seconds"], 2
            ),
            "fields_computed_ratio_vs_cache_orig": _ratio(modes, "cache_orig", "computed_tokens", "llmql_fields"),
        }
        print(json.dumps(speed), flush=True)
        results.append((query.name, n, modes, speed))
        con.close()
    _table(results)


def _ratio(modes: dict, base: str, key: str, ours: str = "llmql") -> float:
    return round(modes[base][key] / max(modes[ours][key], 1), 2)


def _table(results: list) -> None:
    print(
        f"\n{'query':<16}{'rows':>5}{'x cache_orig':>13}{'tok x orig':>11}{'x no_cache':>11}"
        f"{'tok x no_cache':>15}{'no_cache s':>11}{'cache_orig s':>13}{'llmql s':>9}"
        f"{'hit% orig':>10}{'hit% llmql':>11}{'x orig fields':>14}{'tok x fields':>13}{'fields s':>9}"
    )
    for name, n, m, s in results:
        print(
            f"{name:<16}{n:>5}{s['speedup_vs_cache_orig']:>13.2f}"
            f"{s['computed_ratio_vs_cache_orig']:>11.2f}{s['speedup_vs_no_cache']:>11.2f}"
            f"{s['computed_ratio_vs_no_cache']:>15.2f}{m['no_cache']['seconds']:>11.1f}"
            f"{m['cache_orig']['seconds']:>13.1f}{m['llmql']['seconds']:>9.1f}"
            f"{m['cache_orig']['prefix_hit_rate']:>10.1%}{m['llmql']['prefix_hit_rate']:>11.1%}"
            f"{s['fields_speedup_vs_cache_orig']:>14.2f}{s['fields_computed_ratio_vs_cache_orig']:>13.2f}"
            f"{m['llmql_fields']['seconds']:>9.1f}"
        )
    print("headline: x cache_orig = llmql (defaults) vs our engine with its prefix cache, original "
          "order; x orig fields = the same with reorder_fields := true")


if __name__ == "__main__":
    main()
