"""The embedded engine end to end: greedy parity with the cache on/off and under memory
pressure (tiny random models), bad input, choices, seeds, and the real default model
against transformers' greedy generation."""

from __future__ import annotations

import random

import pytest
import torch

from llmql.engine.engine import EmbeddedEngine, EngineConfig
from llmql.engine.models import load_model
from llmql.engine.types import Engine, ErrorKind, GenerationRequest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """NOTE: these batches are tiny; on a shared CPU box extra OpenMP threads only
    oversubscribe the cores (10x slower), so run one thread and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny(request, tiny_model_dir):
    return load_model(str(tiny_model_dir(request.param)))


def _word_prompts(n: int, seed: int = 0, vocab: int = 96) -> list[str]:
    """Prompts sharing an instruction, then a group prefix, then a unique tail."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(k))  # noqa: E731
    shared, groups = words(24), [words(rng.randrange(5, 20)) for _ in range(3)]
    return [f"{shared} {groups[i % 3]} {words(rng.randrange(1, 6))}" for i in range(n)]


def _greedy(lm, prompts, max_tokens=12, **config) -> tuple[list[tuple], EmbeddedEngine]:
    engine = EmbeddedEngine(lm, EngineConfig(**{"kv_tokens": 4096, **config}))
    reqs = [GenerationRequest(p, max_tokens=max_tokens) for p in prompts]
    results = engine.generate(reqs, progress=False)
    assert all(r.finish_reason in ("stop", "length") for r in results), results
    return [(r.text, r.output_tokens, r.finish_reason) for r in results], engine


def test_engine_satisfies_protocol(tiny) -> None:
    assert isinstance(EmbeddedEngine(tiny, EngineConfig(kv_tokens=64)), Engine)


def test_greedy_same_with_cache_on_off_and_under_pressure(tiny) -> None:
    prompts = _word_prompts(8)
    base, off = _greedy(tiny, prompts, prefix_cache=False)
    on_out, on = _greedy(tiny, prompts, prefix_cache=True)
    assert on_out == base
    assert on.stats().cached_tokens > 0 and off.stats().cached_tokens == 0
    assert on.stats().computed_tokens < off.stats().computed_tokens
    paged, _ = _greedy(tiny, prompts, page_size=4, chunk_size=7, max_batch_tokens=40)
    assert paged == base
    # a pool far too small for all requests at once: eviction AND preemption must happen
    tight, engine = _greedy(tiny, prompts, max_tokens=30, kv_tokens=110, chunk_size=16)
    extra = engine.stats().extra
    assert extra["preemptions"] > 0 and extra["evicted_tokens"] > 0, extra
    tight_off, engine_off = _greedy(tiny, prompts, max_tokens=30, kv_tokens=110,
                                    prefix_cache=False)
    assert engine_off.stats().extra["preemptions"] > 0
    wide_off, _ = _greedy(tiny, prompts, max_tokens=30, prefix_cache=False)
    assert tight == tight_off == wide_off


def test_lpm_policy_same_outputs(tiny) -> None:
    prompts = _word_prompts(9, seed=3)
    assert _greedy(tiny, prompts, policy="lpm")[0] == _greedy(tiny, prompts)[0]


def test_cache_salt_isolates_prefix_reuse(tiny) -> None:
    """Identical prompts reuse cached KV only under equal salts; answers never change."""
    engine = EmbeddedEngine(tiny, EngineConfig(kv_tokens=4096))
    prompt = _word_prompts(1, seed=5)[0]
    expected, _ = _greedy(tiny, [prompt], prefix_cache=False)

    def ask(*salts: str | None) -> list[int]:
        results = engine.generate([GenerationRequest(prompt, max_tokens=12, cache_salt=s)
                                   for s in salts], progress=False)
        assert [(r.text, r.output_tokens, r.finish_reason) for r in results] == expected * len(salts)
        return [r.cached_tokens for r in results]

    assert ask("a", "b") == [0, 0]  # one batch: neither waits for nor reuses the other
    assert ask("c") == [0]
    assert min(ask("a", "b", "c")) > 0
    assert ask(None)[0] == 0 and ask(None)[0] > 0  # None is its own shared namespace
    bad = engine.generate([GenerationRequest(prompt, cache_salt=7)], progress=False)[0]  # type: ignore[arg-type]
    assert bad.error_kind == ErrorKind.BAD_REQUEST and "cache_salt" in bad.error


def test_bad_input_is_per_request(tiny) -> None:
    engine = EmbeddedEngine(tiny, EngineConfig(kv_tokens=200))
    max_ctx = tiny.config.max_context
    reqs = [
        GenerationRequest("w5 w6", max_tokens=3),
        GenerationRequest(" ".join(["w7"] * (max_ctx + 5)), max_tokens=3),  # beyond the context
        GenerationRequest(list(range(4, 4 + 220)), max_tokens=3),  # beyond the KV pool
        GenerationRequest("", max_tokens=3),
        GenerationRequest("w5", json_schema={"type": "array"}),  # outside the supported subset
        GenerationRequest("w8 w9", max_tokens=0),
        GenerationRequest("w8 w9", adapter="sql-lora"),
    ]
    res = engine.generate(reqs, progress=False)
    assert res[0].finish_reason in ("stop", "length") and res[0].output_tokens > 0
    assert res[1].finish_reason == "error" and "context" in res[1].error
    assert res[2].finish_reason == "error" and "KV pool" in res[2].error
    assert res[3].finish_reason == "error" and "empty prompt" in res[3].error
    assert res[4].finish_reason == "error" and "json_schema" in res[4].error
    assert res[6].finish_reason == "error" and "adapter 'sql-lora' not found" in res[6].error
    assert (res[5].finish_reason, res[5].text) == ("length", "")
    overflow, bad = ErrorKind.CONTEXT_OVERFLOW, ErrorKind.BAD_REQUEST
    assert [r.error_kind for r in res] == [None, overflow, overflow, bad, bad, None, bad]
    with pytest.raises(ValueError):
        EngineConfig(page_size=0)


def test_step_token_budget_by_device(tiny) -> None:
    """max_batch_tokens 0 (the default) is a smaller step on CPU than on a GPU; an explicit
    budget wins; the scheduler gets the resolved budget."""
    from llmql.engine.engine import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS

    assert EngineConfig().batch_tokens == CPU_BATCH_TOKENS < GPU_BATCH_TOKENS
    assert EngineConfig(device="cuda").batch_tokens == GPU_BATCH_TOKENS
    assert EngineConfig(device="cuda:1", max_batch_tokens=300).batch_tokens == 300
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EngineConfig(max_batch_tokens=-1)
    engine = EmbeddedEngine(tiny, EngineConfig(kv_tokens=256))
    assert engine.scheduler.max_batch_tokens == CPU_BATCH_TOKENS


def test_choices_and_seeds(tiny) -> None:
    engine = EmbeddedEngine(tiny, EngineConfig(kv_tokens=1024))
    choices = ("w10", "w10 w11", "w12 w13 w14")
    reqs = [GenerationRequest(p, choices=choices) for p in _word_prompts(6)]
    assert all(r.text in choices for r in engine.generate(reqs, progress=False))
    sampled = [GenerationRequest(p, max_tokens=8, temperature=1.0, seed=7) for p in _word_prompts(3)]
    a = engine.generate(sampled, progress=True)
    b = EmbeddedEngine(tiny, EngineConfig(kv_tokens=1024)).generate(sampled, progress=False)
    assert [r.text for r in a] == [r.text for r in b]
    s = engine.stats()
    assert s.requests == 9 and s.prompt_tokens > 0 and s.output_tokens > 0 and s.seconds > 0


def test_choices_beside_free_text_compute_only_their_tokens(tiny, monkeypatch) -> None:
    """A step holding `choices` rows and free-text rows (two queries sharing steps) computes
    full-vocabulary logits for the free-text rows only, and every answer equals the one
    each group gets alone."""
    choices = ("w10", "w10 w11", "w12 w13 w14")
    picks = [GenerationRequest(p, choices=choices) for p in _word_prompts(4)]
    free = [GenerationRequest(p, max_tokens=4) for p in _word_prompts(3, seed=1)]
    alone = [*EmbeddedEngine(tiny, EngineConfig(kv_tokens=1024)).generate(picks),
             *EmbeddedEngine(tiny, EngineConfig(kv_tokens=1024)).generate(free)]
    engine = EmbeddedEngine(tiny, EngineConfig(kv_tokens=1024))
    model, calls = engine.lm.model, []
    compute = model.compute_logits

    def spy(hidden, rows=None):
        calls.append((hidden.shape[0], rows is None))
        return compute(hidden, rows)

    monkeypatch.setattr(model, "compute_logits", spy)
    mixed = engine.generate([*picks, *free])
    assert [r.text for r in mixed] == [r.text for r in alone]
    for a, b in zip(mixed[:4], alone[:4]):
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-5)
    full = [n for n, whole in calls if whole]
    assert full and max(full) <= len(free)  # NOTE: never a choices row through the full head
    assert any(not whole for _, whole in calls)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_choice_logprobs_are_unmasked_first_step(family, tiny_model_dir, tiny_hf_model) -> None:
    """`choice_logprobs` = log_softmax of transformers' next-token logits after the prompt
    over the choices' distinct first tokens, read at each choice's first token (choices
    sharing a first token share the value), also
    for a prompt whose prefill is split into chunks and for a sampled request."""
    directory = tiny_model_dir(family)
    lm, hf = load_model(str(directory)), tiny_hf_model(directory)
    engine = EmbeddedEngine(lm, EngineConfig(kv_tokens=2048, chunk_size=16))
    choices = ("w10", "w10 w11", "w12 w13 w14")
    ids = [lm.tokenizer.encode(p) for p in _word_prompts(4)]
    reqs = [GenerationRequest(i, choices=choices, temperature=0.5 * (k == 3), seed=1)
            for k, i in enumerate(ids)]
    results = engine.generate([*reqs, GenerationRequest(ids[0], max_tokens=2)], progress=False)
    assert results[-1].choice_logprobs is None
    first = {c: lm.tokenizer.encode(c, add_bos=False)[0] for c in choices}
    with torch.inference_mode():
        for prompt, res in zip(ids, results):
            tokens = sorted(set(first.values()))
            logits = hf(torch.tensor([prompt])).logits[0, -1].float()
            expected = dict(zip(tokens, torch.log_softmax(logits[tokens], -1).tolist()))
            assert set(res.choice_logprobs) == set(choices)
            for choice, value in res.choice_logprobs.items():
                assert value == pytest.approx(expected[first[choice]], abs=1e-4)
            assert res.choice_logprobs["w10"] == res.choice_logprobs["w10 w11"]


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Review: The movie was a complete waste of time. Sentiment:",
    "Translate to German: Good morning, how are you?",
    "List three primary colors:",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "Photosynthesis is the process by which",
    "SELECT name FROM users WHERE",
    "Instruction: classify the review.\nmovie_info: A heist film.\nreview_content: Loved it.",
    "Instruction: classify the review.\nmovie_info: A heist film.\nreview_content: Boring.",
]


def test_default_model_matches_transformers_greedy(default_model, hf_default) -> None:
    """Our greedy tokens equal transformers' greedy choice on 12 prompts x 16 new tokens.

    Checked by teacher forcing (one transformers forward over prompt + our output per
    prompt): every token we generated must be transformers' argmax after the same prefix,
    which is exactly greedy parity. A mismatch is tolerated only at an fp32 near-tie
    (top-2 logit gap < 1e-3), after which the two generations may legitimately diverge.
    Cache on, so the last two prompts also run on a shared cached prefix.
    """
    engine = EmbeddedEngine(default_model, EngineConfig(kv_tokens=4096))
    tokens: dict[int, list[int]] = {}
    process = engine.output

    def record(req, tok) -> None:
        tokens.setdefault(req.rid, []).append(tok)
        process(req, tok)

    engine.output = record  # type: ignore[assignment]
    ids = [default_model.tokenizer.encode(p) for p in PROMPTS]
    engine.generate([GenerationRequest(i, max_tokens=16) for i in ids], progress=False)
    assert engine.stats().cached_tokens > 0
    exact = 0
    with torch.inference_mode():
        for rid, prompt in enumerate(ids):
            out = tokens[rid]
            seq = torch.tensor([prompt + out[:-1]])
            logits = hf_default.model(seq, logits_to_keep=len(out)).logits[0]
            for step, tok in enumerate(out):
                if int(logits[step].argmax()) != tok:
                    top2 = logits[step].topk(2).values
                    assert float(top2[0] - top2[1]) < 1e-3, (rid, step, tok)
                    break
            else:
                exact += 1
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} prompts identical"


def test_default_model_choices_and_json_schema(default_model) -> None:
    import json

    engine = EmbeddedEngine(default_model, EngineConfig(kv_tokens=2048))
    schema = {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative"]}, "stars": {"type": "integer"},
        "summary": {"type": "string"}}}
    review = "Review: I loved it, a true masterpiece with great acting."
    res = engine.generate([
        GenerationRequest(f"{review}\nSentiment (positive or negative):",
                          choices=("positive", "negative", "neutral")),
        GenerationRequest(f"{review}\nAs JSON:", json_schema=schema, max_tokens=40),
        GenerationRequest("x", json_schema={"type": "array"}),
    ], progress=False)
    assert res[0].text == "positive" and res[0].finish_reason == "stop"
    value = json.loads(res[1].text)
    assert value["sentiment"] in ("positive", "negative") and isinstance(value["stars"], int)
    assert res[2].finish_reason == "error" and "unsupported" in res[2].error
