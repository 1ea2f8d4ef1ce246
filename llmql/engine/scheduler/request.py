"""Request and batch state (mini-sglang `core.py`): dataclasses with derived lengths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmql.engine.constrained import Constraint
from llmql.engine.types import ErrorKind, GenerationRequest, GenerationResult, TokenLogprob

_NO_SLOTS = torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class Req:
    """One request inside the engine.

    `token_ids` is the prompt followed by the output so far; `slots[:num_computed]` hold
    the K/V of its first `num_computed` tokens, the first `cached_len` of them owned by the
    prefix cache (through the locked `node`), the rest by the request.
    """

    rid: int
    token_ids: list[int]
    params: GenerationRequest
    max_new_tokens: int
    prompt_len: int = 0
    slots: torch.Tensor = _NO_SLOTS
    num_computed: int = 0
    cached_len: int = 0
    node: Any = None
    cached_tokens: int = -1  # prompt tokens served from the cache at first admission
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None  # an ErrorKind value when finish_reason == "error"
    text: str = ""
    constraint: Constraint | None = None
    generator: torch.Generator | None = None
    preemptions: int = 0
    choice_logprobs: dict[str, float] | None = None  # set at the first sampled step
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # params.logprobs set
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt_len:
            self.prompt_len = len(self.token_ids)

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.seq_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None, kind: str | None = None) -> None:
        """End the request; `kind` (an ErrorKind) defaults to internal for errors."""
        self.finish_reason, self.error = reason, error
        if reason == "error":
            self.error_kind = kind or ErrorKind.INTERNAL

    def result(self) -> GenerationResult:
        """The public result of a finished request."""
        return GenerationResult(
            text=self.text,
            prompt_tokens=self.prompt_len,
            cached_tokens=max(self.cached_tokens, 0),
            output_tokens=len(self.output_ids),
            finish_reason=self.finish_reason or "error",
            error=self.error,
            choice_logprobs=self.choice_logprobs,
            token_logprobs=(self.token_logprobs[: len(self.output_ids)]
                            if self.params.logprobs is not None and self.finish_reason != "error"
                            else None),
            error_kind=self.error_kind or (ErrorKind.INTERNAL if self.finish_reason in (None, "error") else None),
        )


@dataclass
class ScheduledBatch:
    """One forward: `extend_lens[i]` new tokens of `reqs[i]`, from `starts[i]` on."""

    reqs: list[Req]
    extend_lens: list[int]
    starts: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def samples(self) -> list[bool]:
        """Whether each request's chunk reaches its end (its last row is sampled)."""
        return [s + n == r.seq_len for r, s, n in zip(self.reqs, self.starts, self.extend_lens)]

    @property
    def sampled_reqs(self) -> list[Req]:
        return [r for r, s in zip(self.reqs, self.samples) if s]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.extend_lens)
