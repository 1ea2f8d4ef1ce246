"""`llmql serve`'s request parsing and response bodies (OpenAI's completions and chat API).

Accepted beyond OpenAI's fields: `choices` (and vLLM's `guided_choice`): the answer is one of
these strings; each response choice then carries `choice_logprobs` (per choice, the
log-probability of its first token, as `GenerationResult.choice_logprobs`). `cache_salt` (as
vLLM): a non-empty string; only requests with the same salt share prefix-cache entries
(`GenerationRequest.cache_salt`).

Per-token log-probabilities (`GenerationResult.token_logprobs`) come in OpenAI's shapes:
completions `logprobs: k` → `{tokens, token_logprobs, top_logprobs, text_offset}`; chat
`logprobs: true, top_logprobs: k` → `logprobs.content[{token, logprob, bytes, top_logprobs}]`.
They cover every output token (EOS and stop-string tokens included), and are not streamed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmql.engine.types import ErrorKind, GenerationRequest, GenerationResult, TokenLogprob

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Parsed:
    """A parsed request: one GenerationRequest per prompt, and how to answer."""

    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    logprobs: bool
    chat: bool


Renderer = Callable[[Sequence[Mapping[str, Any]]], "str | list[int]"]


def parse_completion(body: Any, adapter: str | None) -> Parsed:
    """A /v1/completions body → requests (one per prompt)."""
    body = _mapping(body)
    prompts = _prompts(body.get("prompt"))
    logprobs = _number(body, "logprobs", None, int, lo=0, hi=MAX_TOP_LOGPROBS)
    base = _sampling(body, adapter, default_max_tokens=16, logprobs=logprobs)
    stream = _flag(body, "stream")
    if stream and len(prompts) > 1:
        raise APIError(400, "stream: true takes a single prompt", param="prompt")
    return Parsed([_with_prompt(base, p) for p in prompts], stream, _usage_flag(body),
                  logprobs is not None, chat=False)


def parse_chat(body: Any, adapter: str | None, render: Renderer) -> Parsed:
    """A /v1/chat/completions body → one request, its messages rendered by `render`."""
    body = _mapping(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    clean = [_message(m) for m in messages]
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    top = _number(body, "top_logprobs", None, int, lo=0, hi=MAX_TOP_LOGPROBS)
    if top is not None and not _flag(body, "logprobs"):
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top or 0) if _flag(body, "logprobs") else None
    base = _sampling(body, adapter, default_max_tokens=256, logprobs=logprobs)
    try:
        prompt = render(clean)
    except ValueError as exc:
        raise APIError(400, f"chat template: {exc}", param="messages") from exc
    return Parsed([_with_prompt(base, prompt)], _flag(body, "stream"), _usage_flag(body),
                  logprobs is not None, chat=True)


def status_of(result: GenerationResult) -> int:
    """HTTP status for a failed result."""
    kind = result.error_kind
    if kind in (ErrorKind.BAD_REQUEST, ErrorKind.CONTEXT_OVERFLOW):
        return 400
    if kind == ErrorKind.UNAVAILABLE:
        return 503
    if kind == ErrorKind.CANCELLED:
        return 499
    return 500


def completion_body(results: Sequence[GenerationResult], model: str, parsed: Parsed) -> dict:
    """The JSON answer of a (non-streamed) request."""
    choices = [_choice(i, r, parsed) for i, r in enumerate(results)]
    return {"id": new_id(parsed.chat), "object": "chat.completion" if parsed.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(results)}


def chunk_body(cid: str, model: str, parsed: Parsed, piece: str | None,
               finish: str | None = None) -> dict:
    """One streamed chunk (a text piece, or the final one with `finish`)."""
    if parsed.chat:
        delta = {} if piece is None else {"role": "assistant", "content": piece}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
    return {"id": cid, "object": "chat.completion.chunk" if parsed.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """OpenAI's usage object (cached tokens under prompt_tokens_details, as OpenAI and vLLM)."""
    prompt = sum(r.prompt_tokens for r in results)
    output = sum(r.output_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _choice(index: int, result: GenerationResult, parsed: Parsed) -> dict[str, Any]:
    logprobs = None
    if parsed.logprobs and result.token_logprobs is not None:
        logprobs = (chat_logprobs(result.token_logprobs) if parsed.chat
                    else completion_logprobs(result.token_logprobs))
    choice: dict[str, Any] = {"index": index, "finish_reason": result.finish_reason,
                              "logprobs": logprobs}
    if parsed.chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    if result.choice_logprobs is not None:
        choice["choice_logprobs"] = result.choice_logprobs
    return choice


def completion_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The completions API's `logprobs` object (text offsets from the completion's start;
    tokens that decode to the same text share one `top_logprobs` key, the likeliest kept)."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.token: a.logprob for a in reversed(t.top)} for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat API's `logprobs` object."""
    def entry(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top]} for t in tokens]}


def _sampling(body: Mapping[str, Any], adapter: str | None, *, default_max_tokens: int,
              logprobs: int | None = None) -> GenerationRequest:
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if logprobs is not None and _flag(body, "stream"):
        raise APIError(400, "logprobs are not streamed: ask without stream", param="logprobs")
    if body.get("echo") or body.get("suffix") is not None:
        raise APIError(400, "echo and suffix are not supported")
    return GenerationRequest(
        prompt="",
        max_tokens=_number(body, "max_tokens", default_max_tokens, int, lo=1),
        temperature=_number(body, "temperature", 1.0, float, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", 1.0, float, lo=0.0, hi=1.0, open_lo=True),
        seed=_number(body, "seed", None, int),
        stop=_stop(body.get("stop")),
        choices=_choices(body),
        json_schema=_schema(body.get("response_format")),
        adapter=adapter,
        tenant=_optional_str(body, "user"),
        logprobs=logprobs,
        cache_salt=_salt(body),
    )


def _with_prompt(base: GenerationRequest, prompt: str | list[int]) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(base, prompt=prompt)


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def _message(message: Any) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, "each message needs a role and a content", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise APIError(400, "only text content parts are supported", param="messages")
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise APIError(400, "message content must be a string", param="messages")
    return {"role": message["role"], "content": content}


def _choices(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    choices = body.get("choices", body.get("guided_choice"))
    if choices is None:
        return None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise APIError(400, "choices must be a non-empty list of non-empty strings", param="choices")
    return tuple(choices)


def _schema(fmt: Any) -> dict | None:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
    raise APIError(400, "response_format must be {'type': 'json_schema', 'json_schema': "
                   "{'schema': {...}}} or {'type': 'text'}", param="response_format")


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        return tuple(stop)
    raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")


def _number(body: Mapping[str, Any], name: str, default: Any, kind: type, *, lo: float | None = None,
            hi: float | None = None, open_lo: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise APIError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    bad_lo = lo is not None and (value <= lo if open_lo else value < lo)
    if bad_lo or (hi is not None and value > hi):
        raise APIError(400, f"{name} is out of range ({lo}..{hi})", param=name)
    return kind(value)


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string", param=name)
    return value


def _salt(body: Mapping[str, Any]) -> str | None:
    salt = _optional_str(body, "cache_salt")
    if salt == "":
        raise APIError(400, "cache_salt must be a non-empty string", param="cache_salt")
    return salt


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be a boolean", param=name)
    return value


def _usage_flag(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _mapping(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body
