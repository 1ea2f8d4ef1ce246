"""Answer quality: do reordering, calibration and few-shot examples change llmql's answers?

Labelled columns of ../shared/data, one seeded, label-balanced sample per task, the same
rows for every variant (one `run_call` over the whole sample, result cache off, one shared
engine with the default model):

  filter_recommend  products  llm_filter    vs reviews.doRecommend   accuracy
  score_products    products  llm_score 1-5 vs reviews.rating         Spearman rho
  classify_products products  llm_classify  vs reviews.rating (1-2 negative, 3 neutral,
                                            4-5 positive)             accuracy
  score_beer        beer      llm_score 1-5 vs review/overall         Spearman rho
  answer_squad      squad     llm           vs answers                contains-answer rate

Variants: `reordered` (`reorder_fields=True`: the optimizer's per-row field order,
calibrated), `reordered_rerun` (the same call again: the noise floor of batching and cached
KV), `written` (`reorder_fields=False`, the default: the fields as written), `uncalibrated`
(`calibrate=False`, fields reordered; choice tasks only), `few_shot` and `few_shot_written`
(a few labelled examples from rows outside the sample, fields reordered / as written). Every call writes its fields review/question first, the way an analyst
might, so the optimizer moves the shared field(s) first on most rows (`fields_moved`).

Prints one JSON line per (task, variant) (metric, agreement with `reordered`), one per task
(reordering's effect in points), then a table. Usage:
    python benchmarks/quality_bench.py [--rows 80] [--only filter_recommend,...] [--answers out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llmql.ordering import reorder
from llmql.udfs import CallOptions, CallSpec
from llmql.udfs.engines import get_engine
from llmql.udfs.executor import run_call

DATA = Path(
    os.environ.get("LLMQL_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
SENTIMENT = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Task:
    """One labelled call: its spec, a sampler (eval rows, example rows) and a metric."""

    name: str
    spec: CallSpec
    label: str  # the label column of the sampled frame
    metric: str  # accuracy | spearman | contains
    sample: Callable[[int], tuple[pd.DataFrame, pd.DataFrame]]
    shots: Callable[[pd.DataFrame], list[dict]]


def _read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name)


def _stratified(df: pd.DataFrame, key: pd.Series, rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Equal rows per value of `key` (the eval sample, shuffled) and the rest (example pool)."""
    groups = sorted(key.dropna().unique())
    per = max(1, rows // len(groups))
    picked = []
    for g in groups:
        idx = list(df.index[key == g])
        random.Random(f"{seed}-{g}").shuffle(idx)
        picked += idx[:per]
    random.Random(seed).shuffle(picked)
    return df.loc[picked].reset_index(drop=True), df.drop(index=picked)


def _products() -> pd.DataFrame:
    df = _read("products.csv").dropna(subset=["reviews.text", "name"])
    df["sentiment"] = df["reviews.rating"].map(lambda r: SENTIMENT[0 if r <= 2 else 1 if r == 3 else 2])
    return df


def _shortest(pool: pd.DataFrame, key: str, values: list, text: str, fields: tuple, answer) -> list[dict]:
    """One example per label value: the pool row with the shortest `text`."""
    out = []
    for v in values:
        rows = pool[pool[key] == v]
        row = rows.loc[rows[text].str.len().idxmin()]
        out.append({**{f: row[f] for f in fields}, "answer": answer(row)})
    return out


def _beer() -> pd.DataFrame:
    df = _read("beer.csv").dropna(subset=["review/text", "beer/name", "beer/style"])
    df["bucket"] = df["review/overall"].clip(1, 5).astype(int)
    return df


def _squad_sample(rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rows/4 contexts × 4 questions (the data's natural sharing); the rest is the pool."""
    df = _read("squad.csv").dropna(subset=["context", "question", "answers"])
    sizes = df.groupby("context").size()
    contexts = sorted(sizes[sizes >= 4].index)
    chosen = random.Random(seed).sample(contexts, max(1, rows // 4))
    sample = df[df["context"].isin(chosen)].groupby("context").head(4)
    order = list(sample.index)
    random.Random(seed + 1).shuffle(order)
    return df.loc[order].reset_index(drop=True), df[~df["context"].isin(chosen)]


def _squad_shots(pool: pd.DataFrame) -> list[dict]:
    short = pool.assign(n=pool["context"].str.len()).nsmallest(2, "n")
    return [{"question": r.question, "context": r.context, "answer": json.loads(r.answers)[0]}
            for r in short.itertuples()]


def tasks(seed: int) -> list[Task]:
    """The benchmark's tasks (fields written review/question first)."""
    prod_fields = ("reviews.text", "name")
    beer_fields = ("review/text", "beer/name", "beer/style")
    score = CallOptions(lo=1, hi=5)
    return [
        Task(
            "filter_recommend",
            CallSpec("llm_filter", "Does the reviewer recommend the product?", prod_fields),
            "reviews.doRecommend", "accuracy",
            lambda n: _stratified(p := _products(), p["reviews.doRecommend"], n, seed),
            lambda pool: _shortest(pool, "reviews.doRecommend", [True, False], "reviews.text",
                                   prod_fields, lambda r: bool(r["reviews.doRecommend"])),
        ),
        Task(
            "score_products",
            CallSpec("llm_score", "Rate the review from 1 to 5.", prod_fields, score),
            "reviews.rating", "spearman",
            lambda n: _stratified(p := _products(), p["reviews.rating"], n, seed),
            lambda pool: _shortest(pool, "reviews.rating", [1, 3, 5], "reviews.text",
                                   prod_fields, lambda r: int(r["reviews.rating"])),
        ),
        Task(
            "classify_products",
            CallSpec("llm_classify", "How does the reviewer feel about the product?", prod_fields,
                     CallOptions(labels=SENTIMENT)),
            "sentiment", "accuracy",
            lambda n: _stratified(p := _products(), p["reviews.rating"], n, seed),
            lambda pool: _shortest(pool, "sentiment", list(SENTIMENT), "reviews.text",
                                   prod_fields, lambda r: r["sentiment"]),
        ),
        Task(
            "score_beer",
            CallSpec("llm_score", "Rate the reviewer's overall opinion of the beer from 1 to 5.",
                     beer_fields, score),
            "review/overall", "spearman",
            lambda n: _stratified(b := _beer(), b["bucket"], n, seed),
            lambda pool: _shortest(pool, "bucket", [1, 3, 5], "review/text", beer_fields,
                                   lambda r: int(r["bucket"])),
        ),
        Task(
            "answer_squad",
            CallSpec("llm", "Answer the question from the context in a few words.",
                     ("question", "context"), CallOptions(max_tokens=12)),
            "answers", "contains",
            lambda n: _squad_sample(n, seed),
            _squad_shots,
        ),
    ]


def variants(task: Task, shots: list[dict]) -> dict[str, CallSpec]:
    """The call under each variant (calibration only applies to choice functions)."""
    o = replace(task.spec.options, reorder_fields=True)
    spec = replace(task.spec, options=o)
    out = {
        "reordered": spec,
        "reordered_rerun": spec,
        "written": replace(spec, options=replace(o, reorder_fields=False)),
    }
    if task.metric != "contains":
        out["uncalibrated"] = replace(spec, options=replace(o, calibrate=False))
    out["few_shot"] = replace(spec, options=replace(o, examples=shots))
    out["few_shot_written"] = replace(spec, options=replace(o, examples=shots, reorder_fields=False))
    return out


def score(metric: str, answers: list, labels: list) -> float:
    """Accuracy (a NULL answer is wrong), Spearman rho (NULLs dropped) or contains-answer rate."""
    if metric == "accuracy":
        return float(np.mean([a is not None and a == y for a, y in zip(answers, labels)]))
    if metric == "contains":
        return float(np.mean([a is not None and any(g.lower() in a.lower() for g in json.loads(y))
                              for a, y in zip(answers, labels)]))
    pairs = [(a, y) for a, y in zip(answers, labels) if a is not None]
    if len(pairs) < 3:
        return float("nan")
    a, y = (pd.Series(v, dtype=float).rank() for v in zip(*pairs))
    if a.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(a, y)[0, 1])


def fields_moved(spec: CallSpec, table: pa.Table) -> float:
    """Share of distinct rows whose optimizer field order differs from the written one."""
    rows = table.select(list(spec.fields)).to_pylist()
    distinct = pa.Table.from_pylist([dict(t) for t in dict.fromkeys(tuple(r.items()) for r in rows)])
    orders = reorder(distinct, list(spec.fields)).field_orders
    return float(np.mean([tuple(f) != spec.fields for f in orders]))


def run_task(task: Task, rows: int, engine) -> tuple[dict[str, dict], dict[str, list], list]:
    """Every variant of one task on one sample; prints a JSON line per variant. Returns the
    per-variant results, answers and the labels."""
    sample, pool = task.sample(rows)
    table = pa.Table.from_pandas(sample[list(task.spec.fields)], preserve_index=False)
    labels = sample[task.label].tolist()
    moved = fields_moved(task.spec, table)
    results: dict[str, dict] = {}
    answers: dict[str, list] = {}
    for name, spec in variants(task, task.shots(pool)).items():
        t0 = time.perf_counter()
        out = run_call(spec, table, engine=engine, cache=None, progress=False)
        answers[name] = out.values.to_pylist()
        results[name] = {
            "task": task.name, "variant": name, "rows": len(sample), "metric": task.metric,
            "value": round(score(task.metric, answers[name], labels), 4),
            "agreement_with_reordered": round(float(np.mean(
                [a == b for a, b in zip(answers[name], answers["reordered"])])), 4),
            "nulls": sum(a is None for a in answers[name]),
            "fields_moved": round(moved, 4),
            "prefix_hit_rate": round(out.report.prefix_hit_rate, 3),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(json.dumps(results[name]), flush=True)
    return results, answers, labels


def paired_ci(metric: str, a: list, b: list, labels: list, seed: int = 0, n: int = 1000) -> list[float]:
    """95% bootstrap interval (rows resampled, paired) of metric(a) - metric(b), in points."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        ys = [labels[i] for i in idx]
        deltas.append(score(metric, [a[i] for i in idx], ys) - score(metric, [b[i] for i in idx], ys))
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return [round(100 * lo, 1), round(100 * hi, 1)]


def summary(task: Task, res: dict[str, dict], answers: dict[str, list], labels: list) -> dict[str, Any]:
    """Each switch's effect on the metric in points (x100), with a paired bootstrap 95%
    interval for reordering's."""
    def pts(a: str, b: str) -> float | None:
        if a not in res or b not in res:
            return None
        return round(100 * (res[a]["value"] - res[b]["value"]), 1)

    out = {
        "task": task.name, "what": "summary",
        "reorder_minus_written_pts": pts("reordered", "written"),
        "reorder_minus_written_ci95": paired_ci(task.metric, answers["reordered"],
                                                answers["written"], labels),
        "few_shot_reorder_minus_written_pts": pts("few_shot", "few_shot_written"),
        "few_shot_reorder_minus_written_ci95": paired_ci(task.metric, answers["few_shot"],
                                                         answers["few_shot_written"], labels),
        "rerun_minus_reordered_pts": pts("reordered_rerun", "reordered"),
        "calibrated_minus_uncalibrated_pts": pts("reordered", "uncalibrated"),
        "few_shot_minus_zero_shot_pts": pts("few_shot", "reordered"),
        "few_shot_written_minus_written_pts": pts("few_shot_written", "written"),
    }
    print(json.dumps(out), flush=True)
    return out


def table(all_results: dict[str, dict[str, dict]]) -> None:
    names = ["reordered", "reordered_rerun", "written", "uncalibrated", "few_shot", "few_shot_written"]
    print(f"\n{'task':<19}{'metric':<9}{'moved':>6}" + "".join(f"{n:>17}" for n in names))
    for task, res in all_results.items():
        first = next(iter(res.values()))
        cells = "".join(
            f"{res[n]['value']:>9.3f} ({res[n]['agreement_with_reordered']:>4.0%})" if n in res
            else f"{'-':>17}" for n in names)
        print(f"{task:<19}{first['metric']:<9}{first['fields_moved']:>6.0%}{cells}")
    print("cells: metric (agreement of answers with `reordered`)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=80, help="rows per task (label-balanced)")
    ap.add_argument("--only", default="", help="comma-separated task names")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--answers", type=Path, help="write every answer and label (JSON) here")
    args = ap.parse_args()
    engine = get_engine()
    t0 = time.perf_counter()
    all_results, dump = {}, {}
    for task in tasks(args.seed):
        if args.only and task.name not in args.only.split(","):
            continue
        results, answers, labels = run_task(task, args.rows, engine)
        all_results[task.name] = results
        summary(task, results, answers, labels)
        dump[task.name] = {"labels": labels, "answers": answers}
    if args.answers:
        args.answers.write_text(json.dumps(dump, default=str))
    print(json.dumps({"what": "total", "seconds": round(time.perf_counter() - t0, 1)}))
    table(all_results)


if __name__ == "__main__":
    main()
