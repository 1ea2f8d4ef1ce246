"""Submit rendered prompts to the engine in chunks, through the persistent result cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmql.engine.types import Engine, GenerationRequest, GenerationResult
from llmql.settings import get_settings
from llmql.udfs.functions import get_spec, max_tokens
from llmql.udfs.progress import open_progress
from llmql.udfs.result_cache import ResultCache
from llmql.udfs.types import CallReport, CallSpec

_OVERFLOW_WORDS = ("context", "too long", "exceeds", "max_model_len", "kv")


@dataclass(frozen=True)
class PendingPrompt:
    """One distinct prompt to answer, with its result-cache key (send order = list order)."""

    key: str
    prompt: str


class BatchRunner:
    """Answers prompts for one call: cache lookup, then chunked generation, caching each chunk.

    The engine is resolved lazily, so a fully cached call never loads a model. With a
    `null_prompt` (a calibrated call, see `CallOptions.calibrate`), answers with
    `choice_logprobs` are re-selected against that content-free prompt's log-probabilities,
    generated once, on the first such answer (engines without logprobs never send it).
    """

    def __init__(
        self,
        spec: CallSpec,
        engine_factory: Callable[[], Engine],
        cache: ResultCache | None,
        report: CallReport,
        progress: bool | None = None,
        *,
        null_prompt: str | None = None,
    ) -> None:
        self.spec = spec
        self._engine_factory = engine_factory
        self.cache = cache
        self.report = report
        self.progress = get_settings().progress if progress is None else progress
        self._send_schema = spec.function == "llm_extract"
        self.null_prompt = null_prompt
        self._null_logprobs: dict[str, float] | None = None

    def answer(self, pending: Sequence[PendingPrompt]) -> dict[str, str | None]:
        """Texts by key (None where the engine failed on that prompt)."""
        t0 = time.perf_counter()
        answers: dict[str, str | None] = (
            dict(self.cache.get_many([p.key for p in pending])) if self.cache else {}
        )
        self.report.cache_hits += len(answers)
        self.report.add_time("cache", time.perf_counter() - t0)
        misses = [p for p in pending if p.key not in answers]
        if misses:
            answers.update(self._generate(misses))
        return answers

    def _generate(self, misses: Sequence[PendingPrompt]) -> dict[str, str | None]:
        engine = self._engine_factory()
        size = self.spec.options.chunk_size
        out: dict[str, str | None] = {}
        bar = open_progress(self.spec.function, len(misses), show=self.progress,
                            long=len(misses) > size)
        try:
            # NOTE: one chunk is one engine batch in send order; the engine's scheduler lets
            # prompts admitted together share a prefix, so no leaders-first split is needed.
            for i in range(0, len(misses), size):
                chunk = misses[i : i + size]
                out.update(self._run_chunk(engine, chunk))
                bar.advance(len(chunk), self.report)
        finally:
            bar.close()
        return out

    def _run_chunk(self, engine: Engine, chunk: Sequence[PendingPrompt]) -> dict[str, str | None]:
        t0 = time.perf_counter()
        requests = [self._request(p.prompt) for p in chunk]
        results = _generate_isolated(engine, requests)
        if self._send_schema and any(_rejects_schema(r) for r in results):
            # NOTE: engines without json_schema decoding get a JSON prompt; we parse it ourselves.
            self._send_schema = False
            results = _generate_isolated(engine, [self._request(p.prompt) for p in chunk])
        self.report.add_time("generate", time.perf_counter() - t0)
        texts: dict[str, str | None] = {}
        good: list[tuple[str, str]] = []
        for pending, result in zip(chunk, results):
            self._account(result)
            if result.finish_reason == "error" or result.error:
                texts[pending.key] = None
                continue
            text = self._select(engine, result)
            texts[pending.key] = text
            good.append((pending.key, text))
        if self.cache is not None:
            t1 = time.perf_counter()
            self.cache.put_many(good)
            self.report.add_time("cache", time.perf_counter() - t1)
        return texts

    def _select(self, engine: Engine, result: GenerationResult) -> str:
        """The answer: calibrated when this call calibrates and the engine gave logprobs."""
        if self.null_prompt is None or result.choice_logprobs is None:
            return result.text
        if self._null_logprobs is None:
            null = _generate_isolated(engine, [self._request(self.null_prompt)])[0]
            self._account(null)
            self._null_logprobs = null.choice_logprobs or {}
        return calibrated_choice(result.text, result.choice_logprobs, self._null_logprobs)

    def _request(self, prompt: str) -> GenerationRequest:
        o = self.spec.options
        fn = get_spec(self.spec.function)
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens(self.spec),
            temperature=float(o.temperature),
            choices=fn.choices(o),
            stop=fn.stop,
            json_schema=o.json_schema if self._send_schema else None,
            adapter=o.adapter,
        )

    def _account(self, result: GenerationResult) -> None:
        r = self.report
        r.llm_calls += 1
        r.prompt_tokens += result.prompt_tokens
        r.cached_tokens += result.cached_tokens
        r.output_tokens += result.output_tokens
        if result.finish_reason == "error" or result.error:
            message = (result.error or "").lower()
            if any(word in message for word in _OVERFLOW_WORDS):
                r.context_overflows += 1
            else:
                r.errors += 1


def calibrated_choice(text: str, row: dict[str, float], null: dict[str, float]) -> str:
    """Argmax over choices of `row[c] - null[c]` (contextual calibration).

    Choices sharing a first token tie; among the best ones the engine's constrained answer
    `text` wins if it is there, else the first. Without null log-probs, `text` itself.
    """
    if not null or set(row) - set(null):
        return text
    scores = {c: lp - null[c] for c, lp in row.items()}
    best = max(scores.values())
    tied = [c for c, score in scores.items() if score == best]
    return text if text in tied else tied[0]


def _rejects_schema(result: GenerationResult) -> bool:
    return result.finish_reason == "error" and "json_schema" in (result.error or "")


def _generate_isolated(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """One engine call; if it raises, retry one by one so one bad prompt fails alone."""
    try:
        return list(engine.generate(requests, progress=False))
    except Exception:
        if len(requests) == 1:
            return [_failed(requests[0], _last_error())]
    return [_generate_isolated(engine, [r])[0] for r in requests]


def _last_error() -> str:
    import sys

    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}"


def _failed(request: GenerationRequest, error: str) -> GenerationResult:
    return GenerationResult("", 0, 0, 0, "error", error)
