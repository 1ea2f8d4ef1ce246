"""Engine benchmark: transformers batched greedy `generate` vs our engine (prefix cache off
and on) on movie-review prompts grouped by movie, side by side in one run.

Prints one JSON line per measurement, then a table. Usage:
    .venv/bin/python benchmarks/engine_bench.py [--rows 200] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import resource
import time
from pathlib import Path

import torch

INSTRUCTION = (
    "You are given information about a movie and one review of it. Decide whether the "
    "review is positive or negative. Answer with a single word: positive or negative."
)


def data_dir() -> Path:
    env = os.environ.get("LLMQL_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_prompts(rows: int) -> list[str]:
    """The first `rows` rows of movies.csv, grouped by movie (first-appearance order)."""
    with open(data_dir() / "movies.csv", newline="") as f:
        table = list(csv.DictReader(f))
    first: dict[str, int] = {}
    for i, r in enumerate(table):
        first.setdefault(r["movie_title"], i)
    table.sort(key=lambda r: first[r["movie_title"]])  # NOTE: stable: reviews keep file order
    return [
        f"{INSTRUCTION}\nmovie_info: {r['movie_info']}\nreview_content: {r['review_content']}\nAnswer:"
        for r in table[:rows]
    ]


def reuse_bound(prompts: list[list[int]]) -> int:
    """Prompt tokens an unbounded cache could reuse: per prompt, its longest common prefix
    with any earlier prompt (at most len - 1: the last token is always computed)."""
    root: dict = {}
    total = 0
    for ids in prompts:
        node, depth = root, 0
        for t in ids:
            if t not in node:
                break
            node, depth = node[t], depth + 1
        total += min(depth, len(ids) - 1)
        node = root
        for t in ids:
            node = node.setdefault(t, {})
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


class Timer:
    """Wall seconds and this process's CPU seconds (robust to other processes' load)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_hf(model, ids: list[list[int]], batch: int, max_tokens: int, pad: int,
           prefix: int = 0) -> tuple[Timer, list, int]:
    """transformers greedy `generate` over length-sorted batches (least padding), outputs
    back in input order; returns (timer, new-token lists, tokens run through the model).

    `prefix` > 0: the first `prefix` tokens (shared by every prompt) are run once into a
    `DynamicCache`; each batch gets a copy of it, repeated over the batch (transformers'
    prompt-reuse recipe), and pads after the prefix, masked out.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outs: list = [None] * len(ids)
    computed = 0
    with Timer() as timer, torch.inference_mode():
        shared = _prefix_cache(model, ids[0][:prefix]) if prefix else None
        computed += prefix
        for i in range(0, len(order), batch):
            chunk = [ids[j] for j in order[i : i + batch]]
            width = max(map(len, chunk)) - prefix
            pads = [width - (len(x) - prefix) for x in chunk]
            input_ids = torch.tensor([x[:prefix] + [pad] * n + x[prefix:] for x, n in zip(chunk, pads)])
            mask = torch.tensor([[1] * prefix + [0] * n + [1] * (len(x) - prefix) for x, n in zip(chunk, pads)])
            kwargs = {}
            if shared is not None:
                cache = copy.deepcopy(shared)
                cache.batch_repeat_interleave(len(chunk))
                kwargs[_cache_kwarg(model)] = cache
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=pad, **kwargs)
            computed += len(chunk) * width
            for j, row in zip(order[i : i + batch], gen[:, prefix + width :].tolist()):
                outs[j] = row
    return timer, outs, computed


def _prefix_cache(model, prefix: list[int]):
    """The KV cache of the shared prefix (one sequence)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix]), use_cache=True, **{_cache_kwarg(model): cache})
    return cache


def _cache_kwarg(model) -> str:
    """The KV-cache argument's name: `cache` since transformers 5, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def common_prefix(ids: list[list[int]]) -> int:
    """Tokens every prompt starts with (keeping at least one token of each prompt)."""
    n = min(map(len, ids)) - 1
    for k in range(n):
        if any(x[k] != ids[0][k] for x in ids):
            return k
    return n


def run_ours(lm, ids: list[list[int]], max_tokens: int, **config) -> tuple[Timer, list, object]:
    from llmql.engine.engine import EmbeddedEngine, EngineConfig
    from llmql.engine.types import GenerationRequest

    engine = EmbeddedEngine(lm, EngineConfig(**config))
    reqs = [GenerationRequest(x, max_tokens=max_tokens) for x in ids]
    with Timer() as timer:
        res = engine.generate(reqs, progress=False)
    return timer, res, engine.stats()


def load_hf(lm):
    from transformers import AutoModelForCausalLM

    from llmql.engine.loader import default_gguf
    from llmql.settings import get_settings

    gguf = default_gguf(get_settings().cache_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="40 rows, HF probe at batch 8/32 only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--step-budgets", default="",
                    help="only ours, cache off and on, at each of these step token budgets "
                    "(max_batch_tokens, e.g. 512,2048), side by side; no transformers run")
    args = ap.parse_args()
    rows = 40 if args.quick and args.rows == 200 else args.rows
    if args.threads:
        torch.set_num_threads(args.threads)
    from llmql.engine.models import load_model

    lm = load_model()
    tok = lm.tokenizer
    ids = [tok.encode(p) for p in load_prompts(rows)]
    n_prompt, bound = sum(map(len, ids)), reuse_bound(ids)
    common = dict(rows=rows, threads=torch.get_num_threads(), max_tokens=args.max_tokens)
    emit(dict(common, what="workload", prompt_tokens=n_prompt, reuse_bound_tokens=bound,
              peak_rss_mib_model_loaded=round(peak_rss_mib())))

    if args.step_budgets:
        for budget in map(int, args.step_budgets.split(",")):
            for cache in (False, True):
                t, _, stats = run_ours(lm, ids, args.max_tokens, prefix_cache=cache,
                                       kv_tokens=32768, max_batch_tokens=budget)
                emit(dict(common, what="ours_step_budget", max_batch_tokens=budget,
                          prefix_cache=cache, **_rates(t, rows),
                          computed_tokens=stats.computed_tokens))
        return
    results = {}
    for name, cache in (("ours_cache_off", False), ("ours_cache_on", True)):
        t, res, stats = run_ours(lm, ids, args.max_tokens, prefix_cache=cache, kv_tokens=32768)
        results[name] = emit(dict(
            common, what=name, **_rates(t, rows),
            cached_tokens=stats.cached_tokens, computed_tokens=stats.computed_tokens,
            cached_of_bound=round(stats.cached_tokens / max(bound, 1), 4),
            peak_rss_mib=round(peak_rss_mib()), texts=None))
        results[name]["texts"] = [r.text for r in res]

    hf = load_hf(lm)
    pad = tok.bos_id if tok.bos_id is not None else 0
    shared = common_prefix(ids)
    emit(dict(common, what="hf_shared_prefix", tokens=shared))
    probe_rows = ids[: min(32, rows)]
    probes = {}
    for prefix in (0, shared):
        for bs in ((8, 32) if args.quick else (1, 8, 16, 32)):
            t, _, _ = run_hf(hf, probe_rows, bs, args.max_tokens, pad, prefix)
            probes[bs, prefix] = emit(dict(common, what="hf_probe", batch=bs, prefix_reuse=prefix,
                                           rows_probe=len(probe_rows), **_rates(t, len(probe_rows))))
    best_bs, best_prefix = min(probes, key=lambda k: probes[k]["seconds"])
    t, outs, computed = run_hf(hf, ids, best_bs, args.max_tokens, pad, best_prefix)
    hf_texts = [tok.decode([t for t in o if t not in tok.eos_ids and t != pad]) for o in outs]
    results["hf"] = emit(dict(common, what="hf_generate", batch=best_bs, prefix_reuse=best_prefix,
                              length_sorted=True, **_rates(t, rows),
                              computed_tokens=computed,
                              peak_rss_mib=round(peak_rss_mib())))
    summarize(results, hf_texts, n_prompt, bound, common)


def _rates(t: Timer, rows: int) -> dict:
    return dict(seconds=round(t.wall, 3), cpu_seconds=round(t.cpu, 3),
                rows_per_s=round(rows / t.wall, 3), rows_per_cpu_s=round(rows / t.cpu, 3))


def summarize(results: dict, hf_texts: list[str], n_prompt: int, bound: int, common: dict) -> None:
    base, base_cpu = results["hf"]["rows_per_s"], results["hf"]["rows_per_cpu_s"]
    for name in ("ours_cache_off", "ours_cache_on"):
        r = results[name]
        texts = r.pop("texts")
        r["same_text_as_hf"] = round(sum(a == b for a, b in zip(texts, hf_texts)) / len(hf_texts), 4)
        emit(dict(common, what=f"{name}_vs_hf", speedup_wall=round(r["rows_per_s"] / base, 2),
                  speedup_cpu=round(r["rows_per_cpu_s"] / base_cpu, 2),
                  same_text_as_hf=r["same_text_as_hf"]))
    print(f"\nprompt tokens {n_prompt}, reusable by an unbounded cache {bound}")
    print(f"{'config':<16}{'rows/s':>8}{'x HF':>6}{'rows/cpu-s':>11}{'x HF':>6}{'computed tok':>13}"
          f"{'cached tok':>11}{'of bound':>9}{'same as HF':>11}")
    for name in ("hf", "ours_cache_off", "ours_cache_on"):
        r = results[name]
        print(f"{name:<16}{r['rows_per_s']:>8.2f}{r['rows_per_s'] / base:>6.2f}"
              f"{r['rows_per_cpu_s']:>11.2f}{r['rows_per_cpu_s'] / base_cpu:>6.2f}"
              f"{r['computed_tokens']:>13}{r.get('cached_tokens', 0):>11}"
              f"{r.get('cached_of_bound', 0):>9.3f}{r.get('same_text_as_hf', 1):>11.3f}")


if __name__ == "__main__":
    main()
