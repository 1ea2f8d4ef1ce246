"""The remote backend: an `Engine` over any OpenAI-compatible server (llmql serve, vLLM,
SGLang, llama.cpp's server, a hosted API).

Requests start in submission order (a FIFO pool of `concurrency` workers), so a batch in
the optimizer's order reaches the server with neighbours that share prefixes, which its
prefix cache (vLLM's automatic prefix caching, SGLang's radix cache, ours) reuses.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from llmql.engine import openai_protocol as proto
from llmql.engine.types import (
    EngineStats,
    ErrorKind,
    GenerationRequest,
    GenerationResult,
    TextCallback,
)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteConfig:
    """How the backend talks to the server.

    Args:
        concurrency: requests in flight at once.
        rps: most requests started per second (None: no limit).
        retries: attempts after the first on 408/429/5xx, timeouts and connection errors;
            waits grow exponentially from `backoff` seconds (with jitter, capped at 30 s).
        timeout: seconds per HTTP request.
    """

    concurrency: int = 16
    rps: float | None = None
    retries: int = 4
    backoff: float = 0.5
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise ValueError("concurrency >= 1, retries >= 0, backoff >= 0, timeout > 0")
        if self.rps is not None and self.rps <= 0:
            raise ValueError("rps must be > 0 (or None for no limit)")


class RemoteEngine:
    """`Engine` over an OpenAI-compatible endpoint ("http(s)://host:port/v1").

    `model_name` (the result-cache identity) is the base URL plus the served model id.
    Failed requests (after the last retry) give `finish_reason="error"` with an `error_kind`;
    they never raise.
    """

    def __init__(self, url: str, *, served_model: str | None = None, api_key: str | None = None,
                 config: RemoteConfig | None = None) -> None:
        base, _, fragment = url.partition("#")
        self.base_url = base.rstrip("/")
        self.config = config or RemoteConfig()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=self.config.timeout,
            limits=httpx.Limits(max_connections=self.config.concurrency + 2),
        )
        self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="llmql-remote")
        self._lock = threading.Lock()
        self._stats = EngineStats(extra={"retries": 0, "errors": 0})
        self._next_start = 0.0
        self._guided = True
        named = served_model or fragment
        models = self._list_models(required=not named)
        if not named and not models:
            self.close()
            raise ValueError(f"{self.base_url}/models lists no model; name one as URL#model")
        self.served_model = named or str(models[0]["id"])
        self.model_name = f"{self.base_url}#{self.served_model}"
        entry = next((m for m in models if m.get("id") == self.served_model), {})
        # NOTE: `llmql serve` says whether the model has a chat template (an extension of
        # /v1/models); other servers do not, and their prompts stay plain under chat auto.
        self.serves_chat_template = entry.get("has_chat_template") is True

    def submit(self, request: GenerationRequest, *, on_text: TextCallback | None = None
               ) -> Future[GenerationResult]:
        """Queue `request`; requests start in submission order, `concurrency` at a time."""
        return self._pool.submit(self._run, request, on_text)

    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False
                 ) -> list[GenerationResult]:
        """Complete every request (in flight `concurrency` at a time); results in order."""
        return [f.result() for f in [self.submit(r) for r in requests]]

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel requests that have not started (started ones run to completion)."""
        for future in futures:
            future.cancel()

    def stats(self) -> EngineStats:
        """Totals as the server reported them (cached tokens where it reports them)."""
        with self._lock:
            s = self._stats
            return EngineStats(s.requests, s.prompt_tokens, s.cached_tokens, s.computed_tokens,
                               s.output_tokens, s.seconds, dict(s.extra))

    def close(self) -> None:
        """Stop the workers (waiting for requests in flight) and close connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _run(self, request: GenerationRequest, on_text: TextCallback | None) -> GenerationResult:
        t0 = time.perf_counter()
        result = self._attempts(request, on_text)
        if (result.error_kind == ErrorKind.BAD_REQUEST and request.choices is not None
                and self._guided and proto.rejects_guided(result.error or "")):
            self._guided = False  # NOTE: this server has no guided decoding: parse the text
            result = self._attempts(request, on_text)
        self._account(result, time.perf_counter() - t0)
        return result

    def _attempts(self, request: GenerationRequest, on_text: TextCallback | None
                  ) -> GenerationResult:
        body = proto.request_body(request, self.served_model, guided=self._guided)
        path = proto.endpoint(request)
        result = GenerationResult("", 0, 0, 0, "error", "not sent", error_kind=ErrorKind.UNAVAILABLE)
        for attempt in range(self.config.retries + 1):
            if attempt:
                with self._lock:
                    self._stats.extra["retries"] += 1
                time.sleep(_backoff(self.config.backoff, attempt))
            self._throttle()
            result, retry = self._post(path, body, on_text)
            if not retry:
                return result
        return result

    def _post(self, path: str, body: dict, on_text: TextCallback | None
              ) -> tuple[GenerationResult, bool]:
        """One HTTP attempt: (result, whether to retry)."""
        try:
            if on_text is not None and "logprobs" not in body:  # NOTE: logprobs are not streamed
                return self._stream(path, body, on_text)
            response = self._client.post(path, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            return proto.error_result(None, f"{type(exc).__name__}: {exc}"), True
        if response.status_code != 200:
            message = proto.error_message(response.text)
            return (proto.error_result(response.status_code, message),
                    response.status_code in _RETRY_STATUS)
        result = proto.parse_response(response.json())
        if on_text is not None and result.text:
            on_text(result.text)
        return result, False

    def _stream(self, path: str, body: dict, on_text: TextCallback
                ) -> tuple[GenerationResult, bool]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        pieces: list[str] = []
        usage, finish = None, "stop"
        with self._client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                message = proto.error_message(response.read().decode(errors="replace"))
                return (proto.error_result(response.status_code, message),
                        response.status_code in _RETRY_STATUS)
            for line in response.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                usage = event.get("usage") or usage
                finish = ((event.get("choices") or [{}])[0].get("finish_reason") or finish)
                if piece := proto.stream_delta(event):
                    pieces.append(piece)
                    on_text(piece)
        prompt, cached, output = proto.usage_counts(usage)
        return GenerationResult("".join(pieces), prompt, cached, output,
                                "length" if finish == "length" else "stop"), False

    def _throttle(self) -> None:
        """Wait for this request's start slot under the requests-per-second limit."""
        if self.config.rps is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.config.rps
        time.sleep(max(0.0, start - now))

    def _account(self, result: GenerationResult, seconds: float) -> None:
        with self._lock:
            s = self._stats
            s.requests += 1
            s.prompt_tokens += result.prompt_tokens
            s.cached_tokens += result.cached_tokens
            s.computed_tokens += result.prompt_tokens - result.cached_tokens
            s.output_tokens += result.output_tokens
            s.seconds += seconds
            s.extra["errors"] += result.finish_reason == "error"

    def _list_models(self, *, required: bool) -> list[dict]:
        """The server's model entries (GET /models). `required`: with the same retries, and
        a ConnectionError if the server cannot be asked; else one try, [] on any failure."""
        for attempt in range(self.config.retries + 1 if required else 1):
            if attempt:
                time.sleep(_backoff(self.config.backoff, attempt))
            try:
                response = self._client.get("/models")
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                return _model_entries(response)
            if response.status_code not in _RETRY_STATUS:
                break
        if not required:
            return []
        self.close()
        raise ConnectionError(f"cannot list the models of {self.base_url} (is the server up?); "
                              "name the served model as URL#model to skip this")


def load_remote(url: str, **settings: object) -> RemoteEngine:
    """A `RemoteEngine` for `url` ("http(s)://host:port/v1", optionally "#served-model").

    Args:
        url: the endpoint's base URL.
        **settings: `served_model`, `api_key` (default: LLMQL_API_KEY, else OPENAI_API_KEY)
            and `RemoteConfig` fields (concurrency, rps, retries, backoff, timeout).
    """
    from llmql.settings import get_settings

    served = settings.pop("served_model", None)
    api_key = settings.pop("api_key", get_settings().api_key)
    config = RemoteConfig(**settings)  # type: ignore[arg-type]
    return RemoteEngine(url, served_model=served, api_key=api_key, config=config)  # type: ignore[arg-type]


def _backoff(base: float, attempt: int) -> float:
    return min(30.0, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def _model_entries(response: httpx.Response) -> list[dict]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return []
    return [m for m in data if isinstance(m, dict) and "id" in m] if isinstance(data, list) else []
