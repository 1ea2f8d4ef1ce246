"""OpenAI-compatible wire format: requests → JSON bodies and JSON bodies → results.

Used by the remote backend (`llmql.engine.remote`). Extensions beyond OpenAI's API:
`guided_choice` (vLLM's spelling, also understood by `llmql serve`) constrains the answer
to one of the choices; `choice_logprobs` in a response choice (sent by `llmql serve`) carries
each choice's first-token log-probability, as `GenerationResult.choice_logprobs`;
`cache_salt` (vLLM's and `llmql serve`'s prefix-cache isolation, sent only when set).
"""

from __future__ import annotations

from typing import Any

from llmql.engine.types import ErrorKind, GenerationRequest, GenerationResult, TokenLogprob

_OVERFLOW_WORDS = ("context length", "context window", "maximum context", "too long",
                   "max_model_len", "exceeds", "context is")


def request_body(request: GenerationRequest, model: str, *, guided: bool = True) -> dict[str, Any]:
    """The JSON body of `request` for /completions (or /chat/completions if `request.chat`).

    `guided=False` leaves the choices out (for servers without guided decoding: the
    answer text is then parsed by the caller).
    """
    body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens,
                            "temperature": request.temperature}
    if request.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if request.top_p != 1.0:
        body["top_p"] = request.top_p
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.choices is not None and guided:
        body["guided_choice"] = list(request.choices)
    if request.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": request.json_schema}}
    if request.tenant is not None:
        body["user"] = request.tenant
    if request.cache_salt is not None:
        # NOTE: sent only when set: llmql serve and vLLM honour it; a server that refuses
        # unknown fields (OpenAI's own API) answers 400 rather than share the cache unsalted
        body["cache_salt"] = request.cache_salt
    if request.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": request.logprobs} if request.chat
                    else {"logprobs": request.logprobs})
    return body


def endpoint(request: GenerationRequest) -> str:
    """The path (below the base URL) a request goes to."""
    return "/chat/completions" if request.chat else "/completions"


def parse_response(data: dict[str, Any]) -> GenerationResult:
    """A result from a (non-streamed) completion or chat completion response."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    prompt, cached, output = usage_counts(data.get("usage"))
    logprobs = choice.get("choice_logprobs")
    return GenerationResult(
        text=text or "", prompt_tokens=prompt, cached_tokens=cached, output_tokens=output,
        finish_reason=_finish(choice.get("finish_reason")),
        choice_logprobs=dict(logprobs) if isinstance(logprobs, dict) else None,
        token_logprobs=token_logprobs(choice.get("logprobs")),
    )


def token_logprobs(data: Any) -> list[TokenLogprob] | None:
    """Per-token log-probabilities from a choice's `logprobs` (chat or completions shape)."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("content"), list):
        return [_chat_entry(e, top=True) for e in data["content"]]
    tokens, values = data.get("tokens"), data.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return None
    tops = data.get("top_logprobs") or [None] * len(tokens)
    return [TokenLogprob(t, float(v if v is not None else float("-inf")), t.encode(),
                         _completion_top(top)) for t, v, top in zip(tokens, values, tops)]


def _chat_entry(entry: dict[str, Any], *, top: bool = False) -> TokenLogprob:
    token = str(entry.get("token", ""))
    raw = entry.get("bytes")
    alternatives = tuple(_chat_entry(a) for a in entry.get("top_logprobs") or []) if top else ()
    return TokenLogprob(token, float(entry.get("logprob", float("-inf"))),
                        bytes(raw) if isinstance(raw, list) else token.encode(), alternatives)


def _completion_top(top: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(top, dict):
        return ()
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    return tuple(TokenLogprob(t, float(v), t.encode()) for t, v in ranked)


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, cached, output) tokens from a `usage` object (0 where not reported)."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (int(usage.get("prompt_tokens") or 0), int(cached or 0),
            int(usage.get("completion_tokens") or 0))


def stream_delta(event: dict[str, Any]) -> str:
    """The text piece of one streamed chunk (completions or chat)."""
    choice = (event.get("choices") or [{}])[0]
    delta = choice.get("delta")
    return (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""


def error_result(status: int | None, message: str) -> GenerationResult:
    """A failed result: HTTP 400-class → bad_request or context_overflow, else unavailable."""
    if status is not None and 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        low = message.lower()
        kind = (ErrorKind.CONTEXT_OVERFLOW if any(w in low for w in _OVERFLOW_WORDS)
                else ErrorKind.BAD_REQUEST)
    else:
        kind = ErrorKind.UNAVAILABLE
    prefix = f"HTTP {status}: " if status is not None else ""
    return GenerationResult("", 0, 0, 0, "error", prefix + message, error_kind=kind)


def error_message(response_text: str) -> str:
    """The `error.message` of an OpenAI-style error body (else the raw text, shortened)."""
    import json

    try:
        data = json.loads(response_text)
    except ValueError:
        return response_text[:500]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return data["detail"]
    return response_text[:500]


def rejects_guided(message: str) -> bool:
    """Whether a 400 says the server does not know the `guided_choice` field."""
    low = message.lower()
    return "guided_choice" in low or ("unrecognized" in low and "argument" in low)


def _finish(reason: Any) -> str:
    return "length" if reason == "length" else "stop"
