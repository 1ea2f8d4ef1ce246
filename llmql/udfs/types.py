"""Options, reports, outputs and errors shared by every LLM function and connector (the call
spec itself is `llmql.udfs.call.CallSpec`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from llmql.engine.types import REQUEST_POLICIES

FUNCTIONS = ("llm", "llm_filter", "llm_classify", "llm_score", "llm_extract", "llm_agg")
_ON_ERROR = ("null", "raise")
ANSWER = "answer"  # the answer's key in a few-shot example


class UDFError(ValueError):
    """A call that cannot run: bad arguments, unknown function or option. Raised before any
    model call."""


class OutputParseError(ValueError):
    """A model answer that cannot be parsed as the declared output type (`on_error='raise'`)."""


@dataclass(frozen=True)
class CallOptions:
    """Per-call options; SQL named arguments (`max_tokens := 8`) map onto these fields.

    Args:
        model: model to load (None = the settings' model).
        adapter: LoRA adapter name.
        max_tokens: most new tokens per answer (None = the function's default).
        temperature: 0 is greedy; > 0 samples.
        seed: the sampling seed of a call with temperature > 0. Sampled answers are cached
            only with a seed (per seed); without one every query samples afresh.
        labels: llm_classify's labels.
        lo, hi: llm_score's inclusive range.
        json_schema: llm_extract's schema (a dict).
        on_error: "null" (unparseable answer → NULL + count) or "raise".
        result_cache: None = settings.result_cache; False disables the persistent cache.
        chunk_size: most requests of one call in flight at once (also bounded by the
            engine's `max_in_flight`); each answer is cached as it completes, so a crash
            loses only requests in flight.
        context_tokens: llm_agg's token budget per reduce prompt.
        tenant: the fairness group of the call's requests in the engine (the `fair` policy
            shares the engine between tenants). Connectors default it to one id per query
            (`con.sql` call, Spark job); set it (`tenant := 'name'`) to group queries.
        policy: the order of this call's requests among themselves in the engine's queue:
            "fcfs" (the optimizer's send order) or "ltr" (shortest predicted answer first;
            needs an engine policy that learns lengths: ltr or fair); None: the engine's
            policy (`LLMQL_POLICY`). The engine's policy still decides the share between
            tenants. Answers do not depend on it.
        calibrate: with choices (llm_filter, llm_classify, llm_score) at temperature 0, pick
            the answer by contextual calibration (Zhao et al., 2021): each choice's
            first-token log-probability minus the one the same prompt gets with every field
            "N/A". Needs an engine that reports `choice_logprobs`; else the constrained answer.
        reorder_fields: False (the default) keeps the fields in the written order in every
            prompt; rows are still sorted for prefix reuse, and each prompt's text, so its
            answer, does not depend on the other rows of the batch or partition. True lets
            the optimizer pick each row's field order (GGR: more prefix reuse when a
            repeated field is not written first), at the price of answers that can change
            with the layout (docs/benchmarks.md, Answer quality: 5-14 points either way).
        chat: None (auto) renders each prompt as one user turn through the model's chat
            template when the (embedded) model has one, else sends it plain; True always
            does (a remote endpoint gets it on its chat endpoint); False never does.
        examples: few-shot examples, a list of dicts (SQL: a list of structs) naming each of
            the call's fields plus `answer`; shown after the instruction, before the row, in
            the fields' written order (a prefix every row shares). With choices (llm_filter,
            llm_classify, llm_score) each answer must be one of them.
    """

    model: str | None = None
    adapter: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    labels: tuple[str, ...] | None = None
    lo: int | None = None
    hi: int | None = None
    json_schema: dict | None = None
    on_error: str = "null"
    result_cache: bool | None = None
    chunk_size: int = 256
    context_tokens: int = 1536
    tenant: str | None = None
    policy: str | None = None
    calibrate: bool = True
    reorder_fields: bool = False
    chat: bool | None = None
    examples: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", _normalize_examples(self.examples))
        if self.on_error not in _ON_ERROR:
            raise UDFError(f"on_error must be one of {_ON_ERROR}, got {self.on_error!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise UDFError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise UDFError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise UDFError(f"seed must be an integer, got {self.seed!r}")
        for flag in ("calibrate", "reorder_fields"):
            if not isinstance(getattr(self, flag), bool):
                raise UDFError(f"{flag} must be a boolean, got {getattr(self, flag)!r}")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise UDFError(f"chat must be a boolean (or NULL for auto), got {self.chat!r}")
        if self.policy is not None and self.policy not in REQUEST_POLICIES:
            raise UDFError(f"policy must be one of {REQUEST_POLICIES} (or NULL for the engine's), "
                           f"got {self.policy!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise UDFError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> CallOptions:
        """Build options from a mapping, rejecting unknown names with a clear error."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UDFError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        if isinstance(options.get("json_schema"), str):
            options["json_schema"] = _parse_schema(options["json_schema"])
        if options.get("labels") is not None:
            options["labels"] = tuple(options["labels"])
        return cls(**{k: v for k, v in options.items() if v is not None or k == "result_cache"})


_QUERY_IDS = itertools.count(1)


def new_tenant(kind: str = "query") -> str:
    """A fresh tenant id for one query or job (unique in this process)."""
    return f"{kind}-{os.getpid()}-{next(_QUERY_IDS)}"


@dataclass
class CallReport:
    """What one call (or a whole query, via `merge`) cost."""

    rows: int = 0
    null_inputs: int = 0
    distinct_inputs: int = 0
    cache_hits: int = 0
    llm_calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    parse_failures: int = 0
    context_overflows: int = 0
    errors: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # NOTE: MoE models with expert offload: the expert cache's counters (EXPERT_COUNTERS)
    # while the call generated (other calls sharing the engine meanwhile count too).
    experts: dict[str, int] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate wall time for a stage (render, cache, generate, parse, sql...)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def add_experts(self, counters: Mapping[str, int]) -> None:
        """Accumulate expert-cache counters (see `experts`)."""
        for name, n in counters.items():
            self.experts[name] = self.experts.get(name, 0) + n

    def merge(self, other: CallReport) -> CallReport:
        """Add another report's counts and times into this one; returns self."""
        for f in dataclasses.fields(self):
            if f.name == "seconds":
                for stage, secs in other.seconds.items():
                    self.add_time(stage, secs)
            elif f.name == "experts":
                self.add_experts(other.experts)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens served from the engine's prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def expert_hit_rate(self) -> float:
        """Share of expert lookups the expert cache served (0 without expert offload)."""
        lookups = self.experts.get("hits", 0) + self.experts.get("misses", 0)
        return self.experts.get("hits", 0) / lookups if lookups else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetch-predicted experts the next layer then used."""
        predicted = self.experts.get("prefetch_predicted", 0)
        return self.experts.get("prefetch_correct", 0) / predicted if predicted else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the prefix hit rate (and expert-cache rates for MoE)."""
        out = dataclasses.asdict(self)
        out["prefix_hit_rate"] = round(self.prefix_hit_rate, 4)
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        if self.experts:
            out["experts"] |= {"hit_rate": round(self.expert_hit_rate, 4),
                               "prefetch_accuracy": round(self.prefetch_accuracy, 4)}
        else:
            del out["experts"]
        return out

    def format_experts(self) -> str:
        """One line of expert-cache counters ("" without expert offload)."""
        e = self.experts
        if not e:
            return ""
        return (f"experts: {e.get('hits', 0)} hits, {e.get('misses', 0)} misses "
                f"({self.expert_hit_rate:.1%} hit rate), {e.get('bytes_moved', 0) / 2**30:.2f} GiB moved, "
                f"prefetch accuracy {self.prefetch_accuracy:.1%}")


# The expert cache's counters a call report keeps (`llmql.engine.moe.CacheStats` names).
EXPERT_COUNTERS = ("hits", "misses", "bytes_moved", "prefetch_hits", "prefetch_predicted",
                   "prefetch_correct", "evictions")


@dataclass
class CallOutput:
    """Results aligned with the input rows, and the report of the call."""

    values: pa.Array
    report: CallReport


def _parse_schema(text: str) -> dict:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UDFError(f"json_schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise UDFError("json_schema must be a JSON object")
    return schema


def _normalize_examples(examples: Any) -> tuple[dict[str, Any], ...] | None:
    """Few-shot examples as a tuple of plain dicts (None or empty → None); UDFError if they are
    not a list of mappings that each hold an `answer`."""
    if examples is None:
        return None
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
        raise UDFError(
            f"examples must be a list of {{field: value, ..., {ANSWER!r}: ...}} structs, "
            f"got {type(examples).__name__}"
        )
    out = []
    for i, example in enumerate(examples, 1):
        if not isinstance(example, Mapping):
            raise UDFError(f"examples[{i}] must be a struct/dict of field values and {ANSWER!r}, "
                           f"got {example!r}")
        if example.get(ANSWER) is None:
            raise UDFError(f"examples[{i}] has no {ANSWER!r}: {dict(example)!r}")
        out.append({str(k): v for k, v in example.items()})
    return tuple(out) or None
