"""Spark benchmark: `llmql.spark.sql` vs a pandas UDF calling transformers `generate`.

The filter query on movies.csv, Spark local[2], the default model (Gemma 3 270M), result
cache disabled, both modes side by side in one run with warm workers (models loaded by a
warm-up query first):

  hf_pandas_udf  what a Spark user writes today: a pandas UDF that renders every row's prompt
                 (llmql's prompt text, argument field order) and runs transformers on it per
                 mini-batch in the table's order; no prefix reuse.
  llmql_spark    `llmql.spark.sql`: plan, dedup, co-partition by the leading field, GGR
                 reorder per partition, our engine with its radix prefix cache.

Both sides decide with the same rule, so their kept rows are comparable: the answer is
whichever of "yes"/"no" has the higher next-token logit after the prompt (one forward pass
on the transformers side; constrained decoding with `calibrate := false` on llmql's).

Prints one JSON line per measurement, then a table. Usage:
    .venv/bin/python benchmarks/spark_bench.py [--rows 200] [--quick] [--batch 16]
Data: LLMQL_DATA_DIR or ../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import pandas as pd

DATA = Path(
    os.environ.get("LLMQL_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
KIDS = "Is this movie suitable for kids?"
FIELDS = ("movie_info", "review_content")
LLMQL_SQL = (
    f"SELECT id FROM {{table}} WHERE llm_filter('{KIDS}', movie_info, review_content, "
    "calibrate := false)"
)
HF_SQL = "SELECT id FROM {table} WHERE kids_hf(movie_info, review_content)"


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def hf_model_dir() -> Path:
    """The default model saved once as a transformers checkpoint (GGUF loading takes ~70 s)."""
    from llmql.engine.loader import default_gguf
    from llmql.settings import get_settings

    cache = Path(get_settings().cache_dir)
    target = cache / "spark_bench" / "hf-gemma-3-270m"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf(cache)
    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # NOTE: the weights are dequantised on load; drop the GGUF marker so they can be saved
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(target)
    return target


def hf_udf(model_dir: str, batch: int, threads: int):
    """The baseline pandas UDF: transformers' yes/no decision per mini-batch, table order."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("boolean")
    def kids_hf(info: pd.Series, review: pd.Series) -> pd.Series:
        model, tok = _hf_worker_model(model_dir, threads)
        rows = [(i, {"movie_info": a, "review_content": b}) for i, (a, b) in
                enumerate(zip(info, review)) if a is not None and b is not None]
        out: list[bool | None] = [None] * len(info)
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            for (i, _), keep in zip(chunk, _hf_decide(model, tok, [r for _, r in chunk])):
                out[i] = keep
        return pd.Series(out, dtype=object)

    return kids_hf


def _hf_worker_model(model_dir: str, threads: int):
    # NOTE: a module in sys.modules outlives tasks in a reused Python worker
    cache = sys.modules.setdefault("_llmql_spark_bench", types.ModuleType("_llmql_spark_bench"))
    if not hasattr(cache, "model"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        cache.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cache.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return cache.model, cache.tok


def _hf_decide(model, tok, rows: list[dict]) -> list[bool]:
    """Per row: is the next-token logit of "yes" above that of "no"? (the first token of
    each, encoded as a continuation like llmql's choices; left padding, one forward pass)."""
    import torch

    from llmql.udfs import CallSpec
    from llmql.udfs.prompts import render_prompt

    spec = CallSpec("llm_filter", KIDS, FIELDS)
    prompts = [render_prompt(spec, row, FIELDS) for row in rows]
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**enc, logits_to_keep=1).logits[:, -1, :]  # NOTE: last position only
    return (logits[:, yes] > logits[:, no]).tolist()


def run_llmql(spark, table: str) -> tuple[float, set, dict]:
    import llmql.spark

    t0 = time.perf_counter()
    result = llmql.spark.run(spark, LLMQL_SQL.format(table=table), result_cache=False)
    ids = {r.id for r in result.df.collect()}
    report = result.report.total.to_dict()
    report["spark_seconds"] = {k: round(v, 2) for k, v in result.report.seconds.items()}
    return time.perf_counter() - t0, ids, report


def run_hf(spark, table: str) -> tuple[float, set]:
    t0 = time.perf_counter()
    ids = {r.id for r in spark.sql(HF_SQL.format(table=table)).collect()}
    return time.perf_counter() - t0, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="40 rows")
    ap.add_argument("--batch", type=int, default=16, help="baseline generate batch size")
    args = ap.parse_args()
    rows = 40 if args.quick and args.rows == 200 else args.rows
    import llmql.spark

    model_dir = str(hf_model_dir())
    spark = llmql.spark.local_session("local[2]", app_name="llmql-spark-bench")
    threads = max(1, (os.cpu_count() or 1) // spark.sparkContext.defaultParallelism)
    spark.udf.register("kids_hf", hf_udf(model_dir, args.batch, threads))
    frame = pd.read_csv(DATA / "movies.csv")
    spark.createDataFrame(frame.head(rows)).createOrReplaceTempView("movies")
    spark.createDataFrame(frame.tail(8)).createOrReplaceTempView("warmup")
    common = {"rows": rows, "master": "local[2]", "threads_per_worker": threads}
    # NOTE: warm-up loads each mode's model in both Python workers, untimed
    run_hf(spark, "warmup"), run_llmql(spark, "warmup")
    hf_s, hf_ids = run_hf(spark, "movies")
    base = emit(dict(common, mode="hf_pandas_udf", seconds=round(hf_s, 2), kept=len(hf_ids),
                     prefix_hit_rate=0.0, batch=args.batch))
    ours_s, ours_ids, report = run_llmql(spark, "movies")
    ours = emit(dict(common, mode="llmql_spark", seconds=round(ours_s, 2), kept=len(ours_ids),
                     prefix_hit_rate=report["prefix_hit_rate"], llm_calls=report["llm_calls"],
                     prompt_tokens=report["prompt_tokens"], cached_tokens=report["cached_tokens"],
                     worker_seconds=report["seconds"], stage_seconds=report["spark_seconds"]))
    agree = 1 - len(hf_ids ^ ours_ids) / max(1, rows)  # NOTE: same decision rule on both sides
    emit(dict(common, what="speedup", speedup=round(hf_s / ours_s, 2), agreement=round(agree, 3)))
    spark.stop()
    print(f"\n{'mode':<16}{'seconds':>9}{'kept':>6}{'prefix hit':>12}")
    for r in (base, ours):
        print(f"{r['mode']:<16}{r['seconds']:>9.1f}{r['kept']:>6}{r['prefix_hit_rate']:>12.3f}")
    print(f"speedup {hf_s / ours_s:.2f}x, same answers on {agree:.1%} of rows")


if __name__ == "__main__":
    main()
