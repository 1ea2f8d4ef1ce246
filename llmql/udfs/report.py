"""The per-query report: rows, LLM calls, distinct inputs, cache hits, tokens, time per stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmql.udfs.types import CallReport

_T = TypeVar("_T")


@dataclass
class CallEntry:
    """One LLM call of a query and what it cost."""

    id: str
    function: str
    report: CallReport
    seconds: float
    adapter: str | None = None  # the LoRA adapter the call used (None: the base model)


@dataclass
class QueryReport:
    """What a query cost, per LLM call and in total (`con.last_report()`)."""

    calls: list[CallEntry] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_call(
        self, call_id: str, function: str, report: CallReport, seconds: float,
        adapter: str | None = None,
    ) -> None:
        """Record one executed call (and the LoRA adapter it used, if any)."""
        self.calls.append(CallEntry(call_id, function, report, seconds, adapter))
        self.add_time("llm", seconds)

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate wall time of a stage (plan, input_sql, llm, final_sql)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn: Callable[[], _T]) -> _T:
        """Run `fn`, adding its wall time to `stage` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.add_time(stage, time.perf_counter() - t0)

    @property
    def total(self) -> CallReport:
        """The calls' reports summed."""
        out = CallReport()
        for entry in self.calls:
            out.merge(entry.report)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: totals, per-call reports and stage times."""
        return {
            "total": self.total.to_dict(),
            "calls": [
                {"id": c.id, "function": c.function, "adapter": c.adapter, **c.report.to_dict()}
                for c in self.calls
            ],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def format(self) -> str:
        """A short human-readable table."""
        if not self.calls:
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            return f"no LLM calls; stages: {stages or '-'}"
        lines = [
            f"{'call':<8} {'function':<13} {'rows':>6} {'distinct':>8} {'cached':>6} "
            f"{'llm':>5} {'prompt_tok':>10} {'prefix_hit':>10} {'bad':>4} {'secs':>7} {'queue':>6}"
        ]
        for c in self.calls:
            name = f"{c.function}@{c.adapter}" if c.adapter else c.function
            lines.append(_row(c.id, name, c.report, c.seconds))
        if len(self.calls) > 1:
            lines.append(_row("total", "", self.total, sum(c.seconds for c in self.calls)))
        experts = self.total.format_experts()
        if experts:
            lines.append(experts)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        lines.append(f"stages: {stages}" if stages else "stages: -")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _row(name: str, function: str, r: CallReport, seconds: float) -> str:
    bad = r.parse_failures + r.context_overflows + r.errors
    return (
        f"{name:<8} {function:<13} {r.rows:>6} {r.distinct_inputs:>8} {r.cache_hits:>6} "
        f"{r.llm_calls:>5} {r.prompt_tokens:>10} {r.prefix_hit_rate:>10.1%} {bad:>4} {seconds:>7.2f}"
        f" {r.seconds.get('queue', 0.0):>6.2f}"  # NOTE: wait until the engine first admitted the call
    )
