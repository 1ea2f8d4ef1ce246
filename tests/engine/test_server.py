"""`llmql serve` on a real uvicorn server (127.0.0.1, free port) with the official `openai`
client, against the embedded engine's own answers on the same model."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmql.engine import load
from llmql.engine.chat import render_messages
from llmql.engine.server import ServerConfig, create_app
from llmql.engine.serving import running
from llmql.engine.types import GenerationRequest

KEY = "secret"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
            "{% if add_generation_prompt %}w12{% endif %}")
PROMPTS = [f"w{4 + i} w{20 + 3 * i} w{40 + i}" for i in range(8)]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    """A tiny random llama whose tokenizer_config.json carries a chat template."""
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model_dir("llama"), out)
    meta = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**meta, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def engine(chat_model_dir: Path) -> Iterator:
    engine = load(str(chat_model_dir), kv_tokens=4096, max_running=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    config = ServerConfig(api_key=KEY, max_queue=64, max_body_bytes=32_000)
    with running(create_app(engine, config)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def _greedy(engine, prompts, **options) -> list[str]:
    return [r.text for r in engine.generate([GenerationRequest(p, **options) for p in prompts])]


def test_models_health_metrics(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.list().data[0].model_extra["has_chat_template"] is True
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "llmql_queue_depth" in metrics and "llmql_prefix_cache_hit_rate" in metrics


def test_completions_list_matches_embedded(client: openai.OpenAI, engine) -> None:
    out = client.completions.create(model="tiny-chat", prompt=PROMPTS, max_tokens=6,
                                    temperature=0, user="alice")
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == _greedy(
        engine, PROMPTS, max_tokens=6)
    assert out.usage.prompt_tokens == sum(len(p.split()) + 1 for p in PROMPTS)


def test_chat_uses_the_template(client: openai.OpenAI, engine) -> None:
    out = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=5,
        temperature=0)
    ids = render_messages(engine.lm.tokenizer, [{"role": "user", "content": "w5 w6"}])
    assert ids == engine.lm.tokenizer.encode("w10 w5 w6 w11 w12")
    assert out.choices[0].message.content == _greedy(engine, [ids], max_tokens=5)[0]
    assert out.choices[0].message.content == _greedy(engine, ["w5 w6"], max_tokens=5, chat=True)[0]


def test_streaming_gives_the_same_text(client: openai.OpenAI, engine) -> None:
    stream = client.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=8,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == _greedy(engine, PROMPTS[:1], max_tokens=8)[0]
    assert chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny-chat", stream=True, max_tokens=4,
                                          temperature=0, messages=[{"role": "user", "content": "w7"}])
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text == _greedy(engine, ["w7"], max_tokens=4, chat=True)[0]


def test_choices_and_json_schema(client: openai.OpenAI, engine) -> None:
    for spelling in ("choices", "guided_choice"):
        out = client.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=4,
                                        temperature=0, extra_body={spelling: ["w30 w31", "w50"]})
        expected = engine.generate([GenerationRequest(PROMPTS[1], choices=("w30 w31", "w50"))])[0]
        assert out.choices[0].text == expected.text
        assert out.choices[0].model_extra["choice_logprobs"] == pytest.approx(expected.choice_logprobs)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = client.completions.create(
        model="tiny-chat", prompt=PROMPTS[2], max_tokens=12, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert out.choices[0].text == _greedy(engine, PROMPTS[2:3], max_tokens=12, json_schema=schema)[0]


def test_logprobs_match_embedded(client: openai.OpenAI, engine) -> None:
    prompts = PROMPTS[:3]
    want = engine.generate([GenerationRequest(p, max_tokens=5, logprobs=3) for p in prompts])
    out = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=5,
                                    temperature=0, logprobs=3)
    for choice, expected in zip(sorted(out.choices, key=lambda c: c.index), want):
        lp = choice.logprobs
        assert lp.tokens == [t.token for t in expected.token_logprobs]
        assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.token_logprobs],
                                                  abs=1e-4)
        assert all(len(top) == 3 and chosen == pytest.approx(max(top.values()))
                   for chosen, top in zip(lp.token_logprobs, lp.top_logprobs))  # greedy
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
        assert choice.text == expected.text  # NOTE: this word-level vocabulary decodes with spaces
    chat = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2)
    expected = engine.generate([GenerationRequest("w5 w6", max_tokens=4, chat=True,
                                                  logprobs=2)])[0].token_logprobs
    content = chat.choices[0].logprobs.content
    assert [(c.token, bytes(c.bytes)) for c in content] == [(t.token, t.token_bytes) for t in expected]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) and len(c.top_logprobs) == 2
               for c in content)


def test_cache_salt_isolates_the_prefix_cache(client: openai.OpenAI, engine) -> None:
    prompt = " ".join(f"w{50 + i}" for i in range(16))

    def ask(salt: str, chat: bool = False) -> tuple[str, int]:
        if chat:
            out = client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=4,
                temperature=0, extra_body={"cache_salt": salt})
            text = out.choices[0].message.content
        else:
            out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4,
                                            temperature=0, extra_body={"cache_salt": salt})
            text = out.choices[0].text
        return text, out.usage.prompt_tokens_details.cached_tokens

    (first, cold), (second, other) = ask("tenant-1"), ask("tenant-2")
    assert cold == other == 0 and first == second == _greedy(engine, [prompt], max_tokens=4)[0]
    assert ask("tenant-1")[1] > 0
    assert ask("tenant-3", chat=True)[1] == 0 and ask("tenant-3", chat=True)[1] > 0


def test_remote_backend_returns_the_logprobs(url: str, engine) -> None:
    requests = [GenerationRequest(PROMPTS[5], max_tokens=3, logprobs=2),
                GenerationRequest("w5 w6", max_tokens=3, logprobs=2, chat=True)]
    remote = load(f"{url}/v1", api_key=KEY)
    got = remote.generate(requests)
    remote.close()
    for mine, theirs in zip(engine.generate(requests), got):
        assert [(t.token, [a.token for a in t.top]) for t in theirs.token_logprobs] == [
            (t.token, [a.token for a in t.top]) for t in mine.token_logprobs]
        assert [t.logprob for t in theirs.token_logprobs] == pytest.approx(
            [t.logprob for t in mine.token_logprobs], abs=1e-4)


def test_logprobs_are_the_model_distribution_under_choices(engine) -> None:
    """With `choices`, logprobs are the raw model's (the first step equals an unconstrained
    request's), not renormalised over the allowed tokens."""
    free, constrained = engine.generate([
        GenerationRequest(PROMPTS[4], max_tokens=1, logprobs=4),
        GenerationRequest(PROMPTS[4], choices=("w30 w31", "w50"), logprobs=4)])
    first = constrained.token_logprobs[0]
    assert [a.token for a in first.top] == [a.token for a in free.token_logprobs[0].top]
    assert first.logprob < 0 and len(constrained.token_logprobs) == constrained.output_tokens
    assert engine.generate([GenerationRequest("w5", logprobs=21)])[0].error_kind == "bad_request"


def test_64_concurrent_requests(client: openai.OpenAI, engine) -> None:
    prompts = [f"w{4 + i % 50} w{5 + i % 7} w{60 + i % 30}" for i in range(64)]

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == _greedy(engine, prompts, max_tokens=4)


@pytest.mark.parametrize("body, status", [
    ({"prompt": "w5", "n": 2}, 400),
    ({"prompt": "w5", "temperature": -1}, 400),
    ({"prompt": 5}, 400),
    ({"prompt": "w5", "model": "gpt-4"}, 404),
    ({"prompt": "w5 " * 20_000}, 413),
    ({"prompt": ["w5"] * 65}, 429),
    ({"prompt": "w5", "logprobs": 21}, 400),
    ({"prompt": "w5", "logprobs": 1, "stream": True}, 400),
    ({"prompt": "w5", "cache_salt": ""}, 400),
    ({"prompt": "w5", "cache_salt": 3}, 400),
])
def test_error_statuses(url: str, body: dict, status: int) -> None:
    response = httpx.post(f"{url}/v1/completions", json={"max_tokens": 2, **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    assert response.json()["error"]["message"]


def test_api_key_required(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "w5"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_disconnect_mid_stream_frees_kv(url: str, engine) -> None:
    full = engine.generate([GenerationRequest(PROMPTS[3], max_tokens=200)])[0]
    assert full.output_tokens == 200  # NOTE: so only a cancel can end the stream early
    idle, before = engine.kv.available, engine.stats().output_tokens
    body = {"prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while engine.kv.available != idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.kv.available == idle
    assert engine.stats().output_tokens - before < 200


def test_remote_backend_sql_matches_embedded(url: str, engine) -> None:
    import llmql
    from llmql.settings import override

    sql = ("SELECT t, llm('w9 w8', t, max_tokens := 4) AS a, "
           "llm_classify('w7', ['w30', 'w31 w32'], t) AS c "
           "FROM (VALUES ('w5 w6'), ('w5 w7'), ('w40'), ('w5 w6'), ('w41 w5')) v(t) ORDER BY t")
    # NOTE: chat auto both ways: the server says its model has a template (/v1/models), so
    # the remote backend sends the chat endpoint what the embedded engine renders.
    def run(**target) -> tuple[list, Any]:
        with override(api_key=KEY, progress=False), llmql.connect(result_cache=False,
                                                                    **target) as con:
            return con.sql(sql).fetchall(), con.last_report().total

    (embedded, ours), (remote, report) = run(engine=engine), run(model=f"{url}/v1")
    plain = run(engine=engine, chat=False)[1]
    assert remote == embedded
    assert report.prompt_tokens == ours.prompt_tokens > plain.prompt_tokens  # the template's
    assert report.llm_calls >= 8 and report.errors == 0
    remote_engine = load(f"{url}/v1", api_key=KEY)
    assert remote_engine.serves_chat_template
    remote_engine.close()


def test_udfs_chat_option(engine, tiny_model_dir: Callable[[str], Path]) -> None:
    import pyarrow as pa

    from llmql.udfs.executor import CallOptions, CallSpec, run_call
    from llmql.udfs.types import UDFError

    table = pa.table({"t": ["w5 w6", "w7", "w8 w9"]})

    def prompt_tokens(chat: bool | None) -> int:
        spec = CallSpec("llm", "w9", ("t",), CallOptions(max_tokens=2, chat=chat))
        return run_call(spec, table, engine=engine, cache=None).report.prompt_tokens

    auto, plain = prompt_tokens(None), prompt_tokens(False)
    assert auto == prompt_tokens(True) == plain + 3 * 3  # NOTE: "w10", "w11", "w12" per prompt
    base = load(str(tiny_model_dir("llama")), kv_tokens=256)
    spec = CallSpec("llm", "w9", ("t",), CallOptions(max_tokens=2, chat=True))
    with pytest.raises(UDFError, match="no chat template"):
        run_call(spec, table, engine=base, cache=None)
    failed = base.generate([GenerationRequest("w5", chat=True)])[0]
    base.close()
    assert failed.finish_reason == "error" and failed.error_kind == "bad_request"


@pytest.mark.slow
def test_default_model_served_equals_embedded() -> None:
    """The issue's setting: the default model, 64 concurrent clients, and an LLM SQL query
    through the remote backend, all equal to the embedded engine's greedy answers."""
    import llmql

    engine = load()
    prompts = [f"Question {i}: what is {i % 9} plus {i % 5}? Answer:" for i in range(64)]
    sql = ("SELECT t, llm('Name the colour of', t, max_tokens := 4) AS a, "
           "llm_filter('Is this a fruit?', t) AS f FROM (VALUES ('banana'), ('sky'), ('grass'), "
           "('cherry'), ('banana')) v(t) ORDER BY t")
    with llmql.connect(engine=engine, result_cache=False) as con:
        embedded = con.sql(sql).fetchall()
    with running(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda p: client.completions.create(
                model=engine.lm.name, prompt=p, max_tokens=6, temperature=0).choices[0].text,
                prompts))
        _default_model_endpoints(client, engine, url)
        remote = load(f"{url}/v1")
        with llmql.connect(engine=remote, result_cache=False) as con:
            via_remote = con.sql(sql).fetchall()
        remote.close()
    assert answers == _greedy(engine, prompts, max_tokens=6)
    assert via_remote == embedded
    engine.close()


def _default_model_endpoints(client: openai.OpenAI, engine, url: str) -> None:
    """Completions (a list of 8), streaming, choices, JSON schema and a bad request on the
    default model, each equal to (or refused like) the embedded engine."""
    name = engine.lm.name
    prompts = [f"The capital of country number {i} is" for i in range(8)]
    out = client.completions.create(model=name, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == _greedy(engine, prompts, max_tokens=5)
    stream = client.completions.create(model=name, prompt=prompts[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == _greedy(engine, prompts[:1], max_tokens=8)[0]
    review = "Review: a dull, overlong film. Sentiment (positive or negative):"
    out = client.completions.create(model=name, prompt=review, max_tokens=4, temperature=0,
                                    extra_body={"choices": ["positive", "negative"]})
    expected = engine.generate([GenerationRequest(review, choices=("positive", "negative"))])[0]
    assert out.choices[0].text == expected.text
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    prompt = "The first moon landing, as JSON with its year:"
    out = client.completions.create(
        model=name, prompt=prompt, max_tokens=16, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert out.choices[0].text == _greedy(engine, [prompt], max_tokens=16, json_schema=schema)[0]
    assert isinstance(json.loads(out.choices[0].text)["year"], int)
    bad = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and "error" in bad.json()
