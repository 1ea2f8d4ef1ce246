"""Stream rendered prompts to the engine (bounded in flight), through the persistent result cache."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from llmql.engine.types import Engine, ErrorKind, GenerationRequest, GenerationResult
from llmql.settings import get_settings
from llmql.udfs.call import CallSpec
from llmql.udfs.progress import open_progress
from llmql.udfs.result_cache import ResultCache
from llmql.udfs.types import EXPERT_COUNTERS, CallReport, UDFError

_NULL_KEY = "\x00calibration"  # NOTE: the content-free prompt's key; no real key looks like it


@dataclass(frozen=True)
class PendingPrompt:
    """One distinct prompt to answer, with its result-cache key (send order = list order)."""

    key: str
    prompt: str


class BatchRunner:
    """Answers prompts for one call: cache lookup, then streamed generation, caching each answer.

    The engine is resolved lazily, so a fully cached call never loads a model. With a
    `null_prompt` (a calibrated call, see `CallOptions.calibrate`), answers with
    `choice_logprobs` are re-selected against that content-free prompt's log-probabilities.
    It is submitted once, when the first such answer arrives (engines without logprobs never
    send it; sent first, it would prefill beside the first rows instead of reusing their
    prefix), and the loop keeps the engine fed meanwhile: answers that need it wait until it
    is back.
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
        self._held: list[tuple[PendingPrompt, GenerationResult]] = []  # NOTE: waiting for _NULL_KEY
        self._chat = False
        self._resent: set[str] = set()
        self._first_admit = float("inf")

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
        """Stream `misses` to the engine in send order, at most `window` in flight; cache
        each answer as it completes (a kill loses only requests in flight). Ctrl-C (any
        exception) cancels the call's outstanding requests and re-raises."""
        engine = self._engine_factory()
        check = getattr(engine, "check_adapter", None)
        if self.spec.options.adapter is not None and check is not None:
            check(self.spec.options.adapter)  # NOTE: a bad adapter fails the call before any model call
        self._chat = _use_chat(self.spec.options.chat, engine)
        window = min(self.spec.options.chunk_size, getattr(engine, "max_in_flight", 256))
        out: dict[str, str | None] = {}
        todo = iter(misses)
        inflight: dict[Future, PendingPrompt] = {}
        bar = open_progress(self.spec.function, len(misses), show=self.progress,
                            long=len(misses) > 64)
        t0 = time.perf_counter()
        experts_before = expert_counters(engine)
        try:
            while True:
                for p in itertools.islice(todo, max(window - len(inflight), 0)):
                    inflight[self._submit(engine, p)] = p
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                finished = [(inflight.pop(f), _outcome(f)) for f in done]
                out.update(self._finish(engine, finished, inflight))
                bar.advance(sum(p.key != _NULL_KEY for p, _ in finished), self.report)
        except BaseException:
            if hasattr(engine, "cancel"):
                engine.cancel(list(inflight))
            raise
        finally:
            bar.close()
            self.report.add_time("generate", time.perf_counter() - t0)
            if experts_before:
                after = expert_counters(engine)
                self.report.add_experts({k: after[k] - experts_before[k] for k in after})
            if self._first_admit < float("inf"):
                self.report.add_time("queue", max(self._first_admit - t0, 0.0))
        return out

    def _submit(self, engine: Engine, pending: PendingPrompt) -> Future:
        """Submit one prompt; a submit that raises gives an already failed future."""
        t0 = time.perf_counter()
        future = submit_request(engine, self._request(pending.prompt))
        future.add_done_callback(lambda f: self._note_queue(f, t0))
        return future

    def _note_queue(self, future: Future, submitted: float) -> None:
        """The call's queue wait: until the engine first admitted one of its requests
        (engines that report it set `future.queue_s`)."""
        queued = getattr(future, "queue_s", None)
        if queued is not None:
            self._first_admit = min(self._first_admit, submitted + queued)

    def _finish(
        self, engine: Engine, finished: list[tuple[PendingPrompt, GenerationResult]],
        inflight: dict[Future, PendingPrompt],
    ) -> dict[str, str | None]:
        """Account, select and cache the answers of `finished` (a schema-less engine's
        rejections are submitted again with a JSON prompt; answers that need the
        calibration prompt wait for it)."""
        texts: dict[str, str | None] = {}
        ready: list[tuple[PendingPrompt, GenerationResult]] = []
        for pending, result in finished:
            if pending.key == _NULL_KEY:
                self._account(result)
                self._null_logprobs = result.choice_logprobs or {}
                ready += self._held
                self._held = []
                continue
            if _rejects_schema(result) and pending.key not in self._resent:
                # NOTE: engines without json_schema decoding get a JSON prompt; we parse it ourselves.
                self._send_schema = False
                self._resent.add(pending.key)
                inflight[self._submit(engine, pending)] = pending
                continue
            self._account(result)
            if result.finish_reason == "error" or result.error:
                texts[pending.key] = None
            elif self._waits_for_null(result):
                if not self._held:
                    null = PendingPrompt(_NULL_KEY, self.null_prompt or "")
                    inflight[self._submit(engine, null)] = null
                self._held.append((pending, result))
            else:
                ready.append((pending, result))
        good = [(pending.key, self._select(result)) for pending, result in ready]
        texts.update(good)
        if self.cache is not None and good:
            t1 = time.perf_counter()
            self.cache.put_many(good)
            self.report.add_time("cache", time.perf_counter() - t1)
        return texts

    def _waits_for_null(self, result: GenerationResult) -> bool:
        """Whether this answer's selection needs the content-free prompt's log-probs, not
        back yet."""
        return self.null_prompt is not None and result.choice_logprobs is not None and self._null_logprobs is None

    def _select(self, result: GenerationResult) -> str:
        """The answer: calibrated when this call calibrates and the engine gave logprobs."""
        if self.null_prompt is None or result.choice_logprobs is None:
            return result.text
        return calibrated_choice(result.text, result.choice_logprobs, self._null_logprobs or {})

    def _request(self, prompt: str) -> GenerationRequest:
        return self.spec.request(prompt, json_schema=self._send_schema, chat=self._chat)

    def _account(self, result: GenerationResult) -> None:
        r = self.report
        r.llm_calls += 1
        r.prompt_tokens += result.prompt_tokens
        r.cached_tokens += result.cached_tokens
        r.output_tokens += result.output_tokens
        if result.finish_reason == "error" or result.error:
            if result.error_kind == ErrorKind.CONTEXT_OVERFLOW:
                r.context_overflows += 1
            else:
                r.errors += 1


def predicted_tokens(spec: CallSpec, engine: Engine | None) -> float | None:
    """The engine's predicted output tokens for the rows of `spec` (None: the engine has no
    length predictor, or too little data for this call template yet)."""
    predict = getattr(engine, "predicted_tokens", None)
    return predict(spec.request(spec.null_prompt())) if predict is not None else None


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


def expert_counters(engine: Engine) -> dict[str, int]:
    """The engine's expert-cache counters (`EXPERT_COUNTERS`); {} for engines without
    expert offload (dense models, remote endpoints)."""
    stats = getattr(engine, "stats", None)
    experts = stats().extra.get("experts") if callable(stats) else None
    if not experts:
        return {}
    return {k: int(experts.get(k, 0)) for k in EXPERT_COUNTERS}


def _use_chat(option: bool | None, engine: Engine) -> bool:
    """Whether prompts go through the chat template (`CallOptions.chat`; None: auto)."""
    from llmql.engine.chat import has_chat_template

    if option is None:
        return has_chat_template(engine)
    if option and getattr(engine, "lm", None) is not None and not has_chat_template(engine):
        raise UDFError("chat := true, but the model has no chat template")
    return option


def _rejects_schema(result: GenerationResult) -> bool:
    # NOTE: asked only of requests that carried a schema; the retry without it parses JSON itself
    return result.finish_reason == "error" and result.error_kind == ErrorKind.BAD_REQUEST


def submit_request(engine: Engine, request: GenerationRequest) -> Future:
    """`engine.submit(request)`; engines offering only `generate` answer at once. A submit
    that raises gives an already failed future (so one bad prompt fails alone)."""
    try:
        if hasattr(engine, "submit"):
            return engine.submit(request)
        result = engine.generate([request], progress=False)[0]
    except Exception as exc:
        result = _failed(f"{type(exc).__name__}: {exc}")
    future: Future = Future()
    future.set_result(result)
    return future


def _failed(error: str) -> GenerationResult:
    return GenerationResult("", 0, 0, 0, "error", error, error_kind=ErrorKind.INTERNAL)


def _outcome(future: Future) -> GenerationResult:
    """The future's result; a cancelled or raising future is a failed result."""
    if future.cancelled():
        return GenerationResult("", 0, 0, 0, "error", "cancelled", error_kind=ErrorKind.CANCELLED)
    exc = future.exception()
    return _failed(f"{type(exc).__name__}: {exc}") if exc else future.result()


