"""A small deterministic Engine for unit tests of pure executor logic (not the model path)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from llmql.engine.types import EngineStats, GenerationRequest, GenerationResult


class FakeEngine:
    """Answers from `answer(prompt)`; honours `choices` (first choice mentioned in the prompt,
    else the first choice). Counts requests; `fail_on` substrings give an error result."""

    def __init__(self, answer=None, fail_on: Sequence[str] = (), overflow_on: Sequence[str] = ()):
        self.answer = answer or (lambda prompt: prompt.splitlines()[1].split(": ", 1)[-1].upper())
        self.fail_on = tuple(fail_on)
        self.overflow_on = tuple(overflow_on)
        self.prompts: list[str] = []
        self.batches: list[int] = []
        self._stats = EngineStats()
        self.submitted = 0
        self.cancelled: list[Future] = []

    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False):
        self.batches.append(len(requests))
        return [self._one(r) for r in requests]

    def submit(self, request: GenerationRequest, *, on_text=None) -> Future:
        """Answered at once (through `generate`, so tests may patch that)."""
        self.submitted += 1
        future: Future = Future()
        future.set_result(self.generate([request])[0])
        return future

    def cancel(self, futures) -> None:
        self.cancelled += [f for f in futures if not f.done()]

    def _one(self, request: GenerationRequest) -> GenerationResult:
        prompt = request.prompt
        self.prompts.append(prompt)
        self._stats.requests += 1
        if any(s in prompt for s in self.overflow_on):
            return GenerationResult("", 0, 0, 0, "error", "prompt exceeds the context length")
        if any(s in prompt for s in self.fail_on):
            return GenerationResult("", 0, 0, 0, "error", "boom")
        text = self.answer(prompt)
        if request.choices is not None and text not in request.choices:
            text = next((c for c in request.choices if c in prompt.lower()), request.choices[0])
        tokens = len(prompt.split())
        self._stats.prompt_tokens += tokens
        return GenerationResult(text, tokens, 0, 1, "stop")

    def stats(self) -> EngineStats:
        return self._stats
