"""Optimizer benchmark: prefix reuse of original order vs reference GGR vs ours; solver time.

Prints one JSON line per measurement, then a table. Data: ../shared/data (LLMQL_DATA_DIR).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmql.ordering.bounds import phc_upper_bound
from llmql.ordering.encoding import encode
from llmql.ordering.exact import solve_exact
from llmql.ordering.metrics import measure
from llmql.ordering.reference_ggr import reference_ggr
from llmql.ordering.reorder import greedy_order, reorder

DATA = Path(os.environ.get("LLMQL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
# Argument columns in the shape of the paper's queries (keys, titles, shared text, then the row's own text).
QUERIES = {
    "movies": ["rotten_tomatoes_link", "movie_title", "movie_info", "review_content"],
    "products": ["id", "name", "asins", "brand", "categories", "reviews.date", "reviews.rating", "reviews.title", "reviews.text"],
    "beer": ["beer/name", "beer/beerId", "beer/brewerId", "beer/style", "beer/ABV", "review/overall", "review/timeUnix", "user/profileName", "review/text"],
    "posts_comments": ["PostId", "PostTitle", "PostTags", "PostBody", "CommentDate", "CommentText"],
    "squad": ["id", "title", "context", "question"],
}


def emit(**record) -> dict:
    print(json.dumps(record), flush=True)
    return record


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_table(name: str, fields: list[str] | None, columns: str = "query") -> dict:
    """PHR of the three orders on a table's distinct argument rows; `fields=None`: all columns."""
    df = pd.read_csv(DATA / f"{name}.csv", usecols=fields)
    df = df[fields or list(df.columns)].drop_duplicates().reset_index(drop=True)
    ref, ref_s = timed(reference_ggr, df)
    ours, ours_s = timed(reorder, df)
    written = reorder(df, reorder_fields=False)  # NOTE: the udfs default: rows sorted, fields as given
    orders = (("original", None), ("written", written), ("reference", ref), ("ours", ours))
    m = {k: measure(df, o) for k, o in orders}
    bound = phc_upper_bound(df)
    return emit(bench="prefix_reuse", table=name, columns=columns, rows=len(df), fields=df.shape[1],
                **{f"{k}_phr": round(v.hit_rate, 4) for k, v in m.items()},
                **{f"{k}_trie": round(v.trie_hit_rate, 4) for k, v in m.items()},
                phr_bound=round(bound / m["ours"].total, 4),
                ours_minus_reference=round(100 * (m["ours"].hit_rate - m["reference"].hit_rate), 2),
                bound_minus_reference=round(100 * (bound / m["ours"].total - m["reference"].hit_rate), 2),
                reference_s=round(ref_s, 3), ours_s=round(ours_s, 3))


def bench_speed(rows: int = 15000, cols: int = 15, seed: int = 0, repeats: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    pool = [pd.read_csv(DATA / f"{n}.csv", usecols=f)[f] for n, f in QUERIES.items()]
    columns = {}
    for j in range(cols):
        frame = pool[j % len(pool)]
        col = frame.iloc[:, (j // len(pool)) % frame.shape[1]]
        columns[f"f{j}_{col.name}"] = col.iloc[rng.integers(0, len(col), rows)].to_numpy()
    df = pd.DataFrame(columns)
    walls, cpus = [], []
    for _ in range(repeats):  # NOTE: the box is shared; the median of a few runs, wall and CPU
        cpu = time.process_time()
        _, secs = timed(reorder, df)
        walls.append(secs)
        cpus.append(time.process_time() - cpu)
    return emit(bench="solver_speed", rows=rows, fields=cols, repeats=repeats,
                ours_s=round(float(np.median(walls)), 3), ours_cpu_s=round(float(np.median(cpus)), 3))


def bench_exact(samples: int = 30, max_rows: int = 8, seed: int = 0) -> dict:
    """The reorderer itself (`greedy_order`, no check against plain GGR) vs the exact optimum
    (whole-field prefix sharing) on random small samples."""
    rnd = random.Random(seed)
    ratios = []
    for i in range(samples):
        name = list(QUERIES)[i % len(QUERIES)]
        fields = QUERIES[name][:4]
        full = pd.read_csv(DATA / f"{name}.csv", usecols=fields)[fields].drop_duplicates()
        start = rnd.randrange(0, max(1, len(full) - 40))
        df = full.iloc[start : start + 40].sample(rnd.randint(3, max_rows), random_state=i).reset_index(drop=True)
        enc = encode(__import__("pyarrow").Table.from_pandas(df, preserve_index=False), fields)
        codes = np.stack(enc.codes, 1)
        length = np.stack([enc.length[j][enc.codes[j]] for j in range(len(fields))], 1)
        best, _ = solve_exact(codes, length, list(range(len(df))), tuple(range(len(fields))))
        ours = _whole_field_hits(greedy_order(df, exact_rows=0), df, codes, length, fields)
        ratios.append(1.0 if best == 0 else ours / best)
    return emit(bench="exact_gap", samples=samples, max_rows=max_rows, mean_ratio=round(float(np.mean(ratios)), 4),
                min_ratio=round(float(np.min(ratios)), 4))


def _whole_field_hits(order, df, codes, length, fields) -> int:
    index = {f: j for j, f in enumerate(fields)}
    total = 0
    rows = list(zip(order.row_order, order.field_orders))
    for (pr, pf), (r, f) in itertools.pairwise(rows):
        for a, b in zip(pf, f):
            if a != b or codes[pr, index[a]] != codes[r, index[b]]:
                break
            total += int(length[r, index[b]])
    return total


def main() -> None:
    results = [bench_table(n, f) for n, f in QUERIES.items()]
    results += [bench_table(n, None, "all") for n in QUERIES]
    speed = bench_speed()
    exact = bench_exact()
    print("\n| table | columns | rows × fields | original PHR / trie | rows sorted PHR / trie "
          "| reference GGR PHR / trie | ours PHR / trie | PHR bound | ours − ref | bound − ref | ref s | ours s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['table']} | {r['columns']} | {r['rows']} × {r['fields']} | {r['original_phr']:.1%} / "
              f"{r['original_trie']:.1%} | {r['written_phr']:.1%} / {r['written_trie']:.1%} | {r['reference_phr']:.1%} / {r['reference_trie']:.1%} | "
              f"{r['ours_phr']:.1%} / {r['ours_trie']:.1%} | {r['phr_bound']:.1%} | "
              f"{r['ours_minus_reference']:+.2f} | {r['bound_minus_reference']:+.2f} | "
              f"{r['reference_s']} | {r['ours_s']} |")
    print(f"\nsolver: {speed['rows']} × {speed['fields']} in {speed['ours_s']} s wall, {speed['ours_cpu_s']} s CPU "
          f"(median of {speed['repeats']}); "
          f"exact gap: ours/optimum = {exact['mean_ratio']:.2%} on average (min {exact['min_ratio']:.2%})")


if __name__ == "__main__":
    main()
