"""The remote backend against real HTTP test servers: retries, failures, request mapping."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmql.engine import load
from llmql.engine.remote import RemoteConfig, RemoteEngine
from llmql.engine.serving import running
from llmql.engine.types import ErrorKind, GenerationRequest


class FlakyServer:
    """An OpenAI-style completions server that fails its first `fail_first` completions with
    `status` (or every one from the moment `broken` is set) and answers "<prompt> ok" else."""

    def __init__(self, fail_first: int = 0, status: int = 503) -> None:
        self.fail_first, self.status, self.broken = fail_first, status, False
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.complete)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "flaky-model", "object": "model"}]}

    async def complete(self, request: Request) -> JSONResponse:
        body = await request.json()
        with self.lock:
            self.bodies.append(body)
            fail = self.broken or len(self.bodies) <= self.fail_first
        if fail:
            return JSONResponse({"error": {"message": "try later"}}, status_code=self.status)
        if "x" * 50 in body["prompt"]:
            return JSONResponse({"error": {"message": "This model's maximum context length is "
                                           "8 tokens"}}, status_code=400)
        usage = {"prompt_tokens": 5, "completion_tokens": 1,
                 "prompt_tokens_details": {"cached_tokens": 3}}
        return JSONResponse({"choices": [{"text": f"{body['prompt']} ok", "finish_reason": "stop"}],
                             "usage": usage})


def _engine(url: str, **config) -> RemoteEngine:
    return RemoteEngine(f"{url}/v1", api_key="k", config=RemoteConfig(backoff=0.01, **config))


@pytest.mark.parametrize("status", [429, 503])
def test_retries_then_succeeds(status: int) -> None:
    server = FlakyServer(fail_first=3, status=status)
    with running(server.app) as url:
        engine = _engine(url, concurrency=1)
        results = engine.generate([GenerationRequest(f"p{i}") for i in range(4)])
        engine.close()
    assert [r.text for r in results] == [f"p{i} ok" for i in range(4)]
    assert engine.stats().extra["retries"] == 3
    assert (engine.stats().prompt_tokens, engine.stats().cached_tokens) == (20, 12)


def test_failures_after_last_retry_are_results() -> None:
    server = FlakyServer(fail_first=10**9)
    with running(server.app) as url:
        engine = _engine(url, retries=2)
        results = engine.generate([GenerationRequest("a"), GenerationRequest("x" * 60)])
        server.broken, server.status, server.fail_first = False, 503, 0
        overflow = engine.generate([GenerationRequest("x" * 60)])[0]
        engine.close()
    assert all(r.finish_reason == "error" and r.error_kind == ErrorKind.UNAVAILABLE for r in results)
    assert len(server.bodies) == 3 * 2 + 1  # two requests, three attempts each, then one
    assert overflow.error_kind == ErrorKind.CONTEXT_OVERFLOW and "context" in overflow.error


def test_unreachable_endpoint_fails_clearly() -> None:
    from llmql.engine.serving import free_port

    with pytest.raises(ConnectionError, match="cannot list the models"):
        load(f"http://127.0.0.1:{free_port()}/v1", retries=0)


def test_request_mapping_and_identity() -> None:
    server = FlakyServer()
    with running(server.app) as url:
        engine = load(f"{url}/v1", backoff=0.01)
        engine.generate([GenerationRequest(
            "q", max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("\n",),
            choices=("yes", "no"), json_schema={"type": "object"}, tenant="t1"),
            GenerationRequest("q", cache_salt="s1")])
        engine.close()
    assert engine.model_name == f"{url}/v1#flaky-model"
    body = server.bodies[0]
    assert body["model"] == "flaky-model" and body["prompt"] == "q"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (7, 0.5, 0.9, 3)
    assert body["stop"] == ["\n"] and body["guided_choice"] == ["yes", "no"] and body["user"] == "t1"
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "cache_salt" not in body and server.bodies[1]["cache_salt"] == "s1"  # only when set


def test_sends_in_submission_order() -> None:
    server = FlakyServer()
    with running(server.app) as url:
        engine = _engine(url, concurrency=1)
        prompts = [f"row{i}" for i in (5, 1, 4, 2)]
        engine.generate([GenerationRequest(p) for p in prompts])
        engine.close()
    assert [b["prompt"] for b in server.bodies] == prompts


def test_sql_through_failing_endpoint_keeps_answered_rows(tmp_path) -> None:
    import llmql
    from llmql.settings import override

    server = FlakyServer()
    sql = "SELECT t, llm('Say hi to', t) AS a FROM (VALUES {}) v(t) ORDER BY t"
    with running(server.app) as url, override(cache_dir=tmp_path, progress=False):
        engine = load(f"{url}/v1", backoff=0.01, retries=1)
        with llmql.connect(engine=engine) as con:
            first = con.sql(sql.format("('a'), ('b')")).fetchall()
            server.broken = True
            second = con.sql(sql.format("('a'), ('b'), ('c'), ('d')")).fetchall()
            report = con.last_report().total
        engine.close()
    assert [("t: a" in a, "t: b" in a, a.endswith(" ok")) for _, a in first] == [
        (True, False, True), (False, True, True)]  # NOTE: this server echoes the prompt
    assert second == [("a", first[0][1]), ("b", first[1][1]), ("c", None), ("d", None)]
    assert report.errors == 2 and report.cache_hits == 2


def test_spark_worker_keys_remote_results_like_duckdb(tmp_path) -> None:
    """A Spark worker's remote answers are cached under the endpoint and served model id,
    the key the DuckDB path uses: DuckDB then finds them all without asking the server."""
    import pyarrow as pa

    import llmql
    from llmql.connectors.spark.worker import WorkerContext, run_batch
    from llmql.settings import override
    from llmql.udfs.call import CallSpec

    server = FlakyServer()
    with running(server.app) as url, override(cache_dir=tmp_path, progress=False, api_key="k"):
        ctx = WorkerContext.capture(model=f"{url}/v1")
        spark_out = run_batch(ctx, CallSpec("llm", "Say hi to", ("t",)), pa.table({"t": ["a", "b"]}))
        sent = len(server.bodies)
        with llmql.connect(model=f"{url}/v1") as con:
            rows = con.sql("SELECT llm('Say hi to', t) FROM (VALUES ('a'), ('b')) v(t) "
                           "ORDER BY t").fetchall()
            report = con.last_report().total
    assert sent == 2 and len(server.bodies) == 2  # NOTE: no request from DuckDB
    assert [r[0] for r in rows] == spark_out.values.to_pylist()
    assert report.cache_hits == 2 and report.llm_calls == 0


def test_plain_prompts_unless_the_server_says_it_has_a_template() -> None:
    server = FlakyServer()
    with running(server.app) as url:
        engine = _engine(url)
        named = RemoteEngine(f"{url}/v1#other-model", config=RemoteConfig(retries=0))
        engine.close(), named.close()
    assert not engine.serves_chat_template and not named.serves_chat_template
    assert named.model_name == f"{url}/v1#other-model"
