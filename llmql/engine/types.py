"""The engine's public interface (DESIGN.md): requests, results, stats, the Engine protocol."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ErrorKind:
    """Structured kinds of a failed request (`GenerationResult.error_kind`).

    Callers branch on these, never on the words of `GenerationResult.error`.
    """

    CONTEXT_OVERFLOW = "context_overflow"  # the prompt (or prompt + answer) does not fit
    BAD_REQUEST = "bad_request"  # an invalid option: empty prompt/choices, unknown adapter, bad schema
    CANCELLED = "cancelled"  # cancelled by its caller before it finished
    INTERNAL = "internal"  # the engine failed while running it (a crash in the forward, ...)
    UNAVAILABLE = "unavailable"  # the engine or remote endpoint could not be reached


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete.

    Args:
        prompt: text (tokenized by the engine) or token ids.
        max_tokens: most new tokens to generate.
        temperature: 0 is greedy; > 0 samples (with `top_p` and `seed`).
        stop: strings that end generation (not included in the text); leading whitespace
            of the output never matches, so a "\\n" stop cannot end an answer before it starts.
        choices: if set, the output is constrained to exactly one of these strings.
        json_schema: if set, the output is constrained to JSON matching the schema.
        adapter: LoRA adapter name.
        tenant: fairness group (query or user).
        top_p: nucleus sampling mass (with temperature > 0).
        seed: sampling seed (None: unseeded).
        chat: render a text prompt as one user turn through the model's chat template
            (`llmql.engine.chat`; the remote backend uses the chat endpoint instead).
        logprobs: if set (0..20), the result carries `token_logprobs`: each output token's
            log-probability with this many most likely alternatives at its step.
        policy: how this request is ordered among its tenant's requests that ask for the
            same: "fcfs" (arrival order) or "ltr" (shortest predicted answer first); None:
            the engine's policy. The engine's policy still decides the share between
            tenants (the embedded engine; remote backends ignore it).
        cache_salt: prefix-cache isolation: requests reuse each other's cached KV only when
            their salts (and adapters) are equal; e.g. one salt per tenant of a shared
            server, so one tenant cannot time another's prompts; None: the shared cache.
            Answers do not depend on it.
    """

    prompt: str | list[int]
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    json_schema: dict | None = None
    adapter: str | None = None
    tenant: str | None = None
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False
    logprobs: int | None = None
    policy: str | None = None
    cache_salt: str | None = None


REQUEST_POLICIES = ("fcfs", "ltr")  # values of `GenerationRequest.policy`


@dataclass(frozen=True)
class TokenLogprob:
    """One output token (or an alternative to it) and its log-probability.

    The log-probability is the model's, before temperature, top-p and any `choices` or
    `json_schema` mask (vLLM's "raw" logprobs); `token_bytes` are the bytes the token adds
    to the text and `token` their UTF-8 decoding (invalid bytes as U+FFFD). `top` (output
    tokens only): the most likely tokens at that step, best first.
    """

    token: str
    logprob: float
    token_bytes: bytes = b""
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class GenerationResult:
    """The completion of one request, with per-request token accounting.

    `choice_logprobs` (requests with `choices` only): per choice, the log-probability of its
    first token at the first decoding step, a log-softmax over the distinct first tokens of
    the request's choices only (renormalised over them: the engine computes no other
    logits for `choices` batches), before temperature. Choices whose first token is the
    same share the value. None for other requests and for requests that failed.
    """

    text: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    choice_logprobs: dict[str, float] | None = None
    error_kind: str | None = None  # an ErrorKind value when finish_reason == "error"
    token_logprobs: list[TokenLogprob] | None = None  # requests with `logprobs` set


@dataclass
class EngineStats:
    """Totals since the engine was created."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


TextCallback = Callable[[str], None]


@runtime_checkable
class Engine(Protocol):
    """What every backend offers (embedded engine, remote OpenAI-compatible endpoint).

    `submit` is thread-safe: any number of threads may submit at once and their requests
    share the engine's steps. `on_text`, if given, receives each new piece of the output
    text as it is decoded (called on the engine's thread: it must not block).
    """

    def submit(
        self, request: GenerationRequest, *, on_text: TextCallback | None = None
    ) -> Future[GenerationResult]: ...

    def generate(
        self, requests: Sequence[GenerationRequest], *, progress: bool = False
    ) -> list[GenerationResult]: ...

    def cancel(self, futures: Iterable[Future]) -> None: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
