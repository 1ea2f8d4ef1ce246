"""llm_agg: summarise each group, reducing hierarchically when a group does not fit the context.

Level 0 packs each group's values into prompts of at most `options.context_tokens` (estimated);
every prompt of every group goes to the engine as one batch; the summaries become the next
level's values, until each group has one summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from llmql.engine.types import Engine
from llmql.ordering.render import render_value
from llmql.udfs.batch import BatchRunner, PendingPrompt
from llmql.udfs.call import CallSpec
from llmql.udfs.executor import _DEFAULT, engine_factory, key_model, resolve_cache
from llmql.udfs.functions import get_spec
from llmql.udfs.prompts import cache_key, output_signature
from llmql.udfs.result_cache import ResultCache
from llmql.udfs.types import CallOutput, CallReport, UDFError

_CHARS_PER_TOKEN = 3  # NOTE: conservative estimate; the engine reports overflows exactly.


def run_agg(
    spec: CallSpec,
    groups: Sequence[Sequence[Any]],
    *,
    engine: Engine | None = None,
    cache: ResultCache | object | None = _DEFAULT,
    progress: bool | None = None,
) -> CallOutput:
    """Summarise each group of values into one string (NULL for a group of only NULLs).

    Args:
        spec: an `llm_agg` CallSpec with one field (the aggregated column's name).
        groups: the values of each group.
        engine, cache, progress: as for `run_call`.

    Returns:
        CallOutput whose `values` is a string array with one summary per group.
    """
    if spec.function != "llm_agg" or len(spec.fields) != 1:
        raise UDFError("run_agg needs an llm_agg call with exactly one column")
    report = CallReport(rows=sum(len(g) for g in groups))
    runner = BatchRunner(
        spec, engine_factory(spec, engine), resolve_cache(spec, cache), report, progress
    )
    model = key_model(spec, engine)
    items = [[render_value(v) for v in g if v is not None] for g in groups]
    report.null_inputs = sum(len(g) for g in groups) - sum(len(i) for i in items)
    report.distinct_inputs = len({v for group in items for v in group})
    done: list[str | None] = [None] * len(items)
    level, active = 0, [i for i, g in enumerate(items) if g]
    while active:
        summaries = _reduce_level(spec, runner, [items[i] for i in active], level, model)
        next_active = []
        for i, parts in zip(active, summaries):
            if parts is None or len(parts) == 1:
                done[i] = parts[0] if parts else None
            else:
                items[i] = parts
                next_active.append(i)
        level, active = level + 1, next_active
    return CallOutput(pa.array(done, type=pa.string()), report)


def _reduce_level(
    spec: CallSpec, runner: BatchRunner, groups: list[list[str]], level: int, model: str
) -> list[list[str] | None]:
    """One batch over all groups' chunks; per group its list of summaries (None on failure)."""
    budget = spec.options.context_tokens * _CHARS_PER_TOKEN
    signature = {**output_signature(spec), "level": level}
    chunked = [_pack(g, budget) for g in groups]
    pending = []
    for chunks in chunked:
        for chunk in chunks:
            prompt = _render(spec, chunk, level)
            pending.append(PendingPrompt(cache_key(model, signature, {"items": prompt}), prompt))
    t0 = time.perf_counter()
    texts = runner.answer(list({p.key: p for p in pending}.values()))
    runner.report.add_time("aggregate", time.perf_counter() - t0)
    out: list[list[str] | None] = []
    it = iter(pending)
    for chunks in chunked:
        answers = [texts.get(next(it).key) for _ in chunks]
        ok = [a.strip() for a in answers if a is not None and a.strip()]
        out.append(ok or None)
    return out


def _pack(values: list[str], budget: int) -> list[list[str]]:
    """Consecutive values in chunks of at most `budget` characters (at least two per chunk
    when there are several, so every level shrinks the group)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for value in values:
        if chunks[-1] and size + len(value) > budget and len(chunks[-1]) >= 2:
            chunks.append([])
            size = 0
        chunks[-1].append(value)
        size += len(value) + 1
    return chunks


def _render(spec: CallSpec, chunk: list[str], level: int) -> str:
    name = spec.fields[0] if level == 0 else "summary"
    lines = [spec.instruction.strip()]
    lines.extend(f"{name}: {value}" for value in chunk)
    lines.append(get_spec("llm_agg").cue(spec.options))
    return "\n".join(lines)
