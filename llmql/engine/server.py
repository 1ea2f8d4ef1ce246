"""`llmql serve`: an OpenAI-compatible HTTP server (FastAPI) over one engine service.

Every handler submits to the same engine (`Engine.submit`), so concurrent clients share its
continuous batching, prefix cache and scheduling policy; `user` becomes the request's tenant.
Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions. Request fields: see `llmql.engine.server_schema`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from llmql.engine import server_schema as schema
from llmql.engine.chat import has_chat_template, render_messages
from llmql.engine.server_schema import APIError, Parsed
from llmql.engine.types import Engine, GenerationRequest, GenerationResult


@dataclass(frozen=True)
class ServerConfig:
    """Server limits.

    Args:
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
        max_queue: most requests in flight; more are answered 429.
        max_body_bytes: larger request bodies are answered 413.
        served_name: the model id clients name (default: the engine's model).
    """

    api_key: str | None = None
    max_queue: int = 512
    max_body_bytes: int = 4 << 20
    served_name: str | None = None


@dataclass
class _Counters:
    requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    tokens: Counter = field(default_factory=Counter)  # prompt/cached/output -> count
    tenants: Counter = field(default_factory=Counter)  # tenant -> tokens served
    in_flight: int = 0


class Server:
    """The app's state: the engine, its served names and the counters behind /metrics."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.name = config.served_name or _engine_name(engine)
        self.counters = _Counters()

    def adapter_of(self, model: Any) -> str | None:
        """The adapter a request's `model` names (None: the base model). Engines that serve
        LoRA adapters list them through an `adapter_names()` method."""
        if model in (None, "", self.name):
            return None
        names = getattr(self.engine, "adapter_names", None)
        if isinstance(model, str) and callable(names) and model in names():
            return model
        raise APIError(404, f"model {model!r} is not served here (try {self.name!r})",
                       param="model", code="model_not_found")

    def render(self, messages: Sequence[dict[str, str]]) -> str | list[int]:
        """Chat messages → a prompt, through the embedded model's chat template."""
        tokenizer = getattr(getattr(self.engine, "lm", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("this engine has no tokenizer to render chat messages")
        return render_messages(tokenizer, messages)

    def admit(self, count: int) -> None:
        if self.counters.in_flight + count > self.config.max_queue:
            raise APIError(429, f"server busy: {self.counters.in_flight} requests in flight "
                           f"(limit {self.config.max_queue})", kind="rate_limit_error")
        self.counters.in_flight += count

    def finish(self, requests: Sequence[GenerationRequest], results: Sequence[GenerationResult]
               ) -> None:
        self.counters.in_flight -= len(requests)
        for request, result in zip(requests, results):
            c = self.counters.tokens
            c["prompt"] += result.prompt_tokens
            c["cached"] += result.cached_tokens
            c["output"] += result.output_tokens
            self.counters.tenants[request.tenant or ""] += result.prompt_tokens + result.output_tokens

    def submit(self, requests: Sequence[GenerationRequest]) -> list[Future[GenerationResult]]:
        return [self.engine.submit(r) for r in requests]


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (run it with uvicorn; `llmql serve` does)."""
    server = Server(engine, config or ServerConfig())
    app = FastAPI(title="llmql", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(_Guard, server=server)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(server), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.name, *_adapter_names(engine)]
        chat = has_chat_template(engine)  # NOTE: an extension field the remote backend reads
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                            "owned_by": "llmql", "has_chat_template": chat}
                                           for n in names]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _handle(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _handle(server, request, chat=True)

    return app


async def _handle(server: Server, request: Request, *, chat: bool) -> Any:
    try:
        body = await _read_json(server.config, request)
        adapter = server.adapter_of(body.get("model") if isinstance(body, dict) else None)
        parsed = (schema.parse_chat(body, adapter, server.render) if chat
                  else schema.parse_completion(body, adapter))
        server.admit(len(parsed.requests))
    except APIError as exc:
        return _error(exc)
    if parsed.stream:
        return StreamingResponse(_stream(server, parsed), media_type="text/event-stream")
    futures = server.submit(parsed.requests)
    try:
        results = await _wait(server.engine, request, futures)
    finally:
        server.finish(parsed.requests, [f.result() for f in futures if f.done() and not f.cancelled()])
    if results is None:  # NOTE: nobody reads this answer; the requests were cancelled
        return _error(APIError(499, "client disconnected"))
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        kind = "server_error" if schema.status_of(failed) >= 500 else "invalid_request_error"
        return _error(APIError(schema.status_of(failed), failed.error or "failed", kind=kind,
                               code=failed.error_kind))
    return JSONResponse(schema.completion_body(results, server.name, parsed))


async def _wait(engine: Engine, request: Request, futures: list[Future[GenerationResult]]
                ) -> list[GenerationResult] | None:
    """Await the futures; a client that disconnects meanwhile cancels them (frees their KV)
    and gets None."""
    waiting = [asyncio.wrap_future(f) for f in futures]
    while True:
        _, pending = await asyncio.wait(waiting, timeout=0.25)
        if not pending:
            return [f.result() for f in futures]
        if await request.is_disconnected():
            engine.cancel(futures)
            return None


async def _stream(server: Server, parsed: Parsed) -> AsyncIterator[str]:
    """SSE chunks of one request; closing the stream early cancels the request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    request = parsed.requests[0]
    future = server.engine.submit(
        request, on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    cid = schema.new_id(parsed.chat)
    result: GenerationResult | None = None
    try:
        while (piece := await queue.get()) is not None:
            yield _sse(schema.chunk_body(cid, server.name, parsed, piece))
        result = future.result()
        if result.finish_reason == "error":
            yield _sse(APIError(schema.status_of(result), result.error or "failed",
                                code=result.error_kind).body())
        else:
            yield _sse(schema.chunk_body(cid, server.name, parsed, None, result.finish_reason))
            if parsed.include_usage:
                yield _sse({**schema.chunk_body(cid, server.name, parsed, None), "choices": [],
                            "usage": schema.usage([result])})
        yield "data: [DONE]\n\n"
    finally:
        if not future.done():
            server.engine.cancel([future])
        server.finish([request], [result] if result is not None else [])


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _read_json(config: ServerConfig, request: Request) -> Any:
    raw = await request.body()
    if len(raw) > config.max_body_bytes:
        raise APIError(413, f"request body over {config.max_body_bytes} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the request body is not JSON: {exc}") from exc


class _Guard:
    """ASGI middleware: API key and body-size checks, and request counts by route/status.

    NOTE: pure ASGI (not BaseHTTPMiddleware) so streamed responses see client disconnects.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        request = Request(scope)
        try:
            _check_key(self.server.config, request)
            _check_size(self.server.config, request)
        except APIError as exc:
            await _error(exc)(scope, receive, send_counted)
        else:
            await self.app(scope, receive, send_counted)
        finally:
            self.server.counters.requests[(scope["path"], status[0])] += 1


def _check_key(config: ServerConfig, request: Request) -> None:
    if config.api_key is None or request.url.path == "/health":
        return
    if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
        raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                       kind="authentication_error", code="invalid_api_key")


def _check_size(config: ServerConfig, request: Request) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        raise APIError(413, f"request body over {config.max_body_bytes} bytes")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _engine_name(engine: Engine) -> str:
    lm = getattr(engine, "lm", None)
    return str(getattr(lm, "name", None) or getattr(engine, "model_name", None) or "llmql")


def _adapter_names(engine: Engine) -> list[str]:
    names = getattr(engine, "adapter_names", None)
    return list(names()) if callable(names) else []


def _metrics(server: Server) -> str:
    """Prometheus text exposition of the server's counters and the engine's stats."""
    c, stats = server.counters, server.engine.stats()
    lines = ["# TYPE llmql_requests_total counter"]
    lines += [f'llmql_requests_total{{route="{route}",status="{status}"}} {n}'
              for (route, status), n in sorted(c.requests.items())]
    for kind in ("prompt", "cached", "output"):
        lines += [f"# TYPE llmql_{kind}_tokens_total counter",
                  f"llmql_{kind}_tokens_total {c.tokens[kind]}"]
    lines += ["# TYPE llmql_prefix_cache_hit_rate gauge",
              f"llmql_prefix_cache_hit_rate {stats.cache_hit_rate:.6f}",
              "# TYPE llmql_queue_depth gauge", f"llmql_queue_depth {c.in_flight}",
              "# TYPE llmql_tenant_tokens_total counter"]
    lines += [f'llmql_tenant_tokens_total{{tenant="{_label(t)}"}} {n}'
              for t, n in sorted(c.tenants.items())]
    lines += [f"# TYPE llmql_engine_{k} gauge\nllmql_engine_{k} {v}"
              for k, v in sorted(stats.extra.items()) if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
