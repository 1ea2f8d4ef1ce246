"""Sampler, finish checks and the choices trie on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from llmql.engine.constrained import ChoiceTrie
from llmql.engine.sampler import OutputProcessor, Sampler
from llmql.engine.scheduler.request import Req
from llmql.engine.types import GenerationRequest

# a toy tokenizer: one token per character, id = ord(c); EOS = 0
EOS = 0


class _Tok:
    eos_ids = frozenset({EOS})

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def _req(**kw) -> Req:
    params = GenerationRequest("p", **kw)
    return Req(0, [1, 2], params, params.max_tokens)


def _run(req: Req, scores: list[dict[int, float]]) -> Req:
    """Feed one logits row per step (missing ids score 0) until the request finishes."""
    sampler, out = Sampler(), OutputProcessor(_Tok())
    for step in scores:
        row = torch.zeros(1, 128)
        for tok, s in step.items():
            row[0, tok] = s
        out(req, sampler.sample([req], row)[0])
        if req.finished:
            break
    return req


def test_greedy_eos_and_length() -> None:
    r = _run(_req(max_tokens=5), [{ord("h"): 5}, {ord("i"): 5}, {EOS: 9}])
    assert (r.text, r.finish_reason, len(r.output_ids)) == ("hi", "stop", 3)
    r = _run(_req(max_tokens=2), [{ord("a"): 1}] * 5)
    assert (r.text, r.finish_reason) == ("aa", "length")


def test_stop_string_excluded() -> None:
    steps = [{ord(c): 5} for c in "yes.\nmore"]
    r = _run(_req(max_tokens=20, stop=("\n", "zz")), steps)
    assert (r.text, r.finish_reason) == ("yes.", "stop")


def test_leading_whitespace_does_not_stop() -> None:
    steps = [{ord(c): 5} for c in "\n ok\nmore"]
    r = _run(_req(max_tokens=20, stop=("\n",)), steps)
    assert (r.text, r.finish_reason) == ("\n ok", "stop")


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    draws = []
    for _ in range(2):
        req = _req(temperature=1.0, seed=42)
        draws.append([Sampler().sample([req], logits)[0] for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    req = _req(temperature=1.0, top_p=1e-6, seed=1)  # nucleus of one token == greedy
    assert Sampler().sample([req], logits)[0] == int(logits.argmax())


def _choice_req(choices: tuple[str, ...]) -> Req:
    req = _req(max_tokens=64, choices=choices)
    req.constraint = ChoiceTrie(choices, _Tok().encode, _Tok.eos_ids).start()
    return req


def test_choices_mask_and_leaf() -> None:
    # the model prefers "z" everywhere, which is never allowed
    steps = [{ord("z"): 9, ord("n"): 1}, {ord("z"): 9}, {ord("z"): 9}]
    r = _run(_choice_req(("yes", "no")), steps)
    assert (r.text, r.finish_reason) == ("no", "stop")


def test_choices_prefix_of_each_other() -> None:
    choices = ("pos", "positive", "neg")
    # EOS after "pos" selects the shorter choice
    steps = [{ord("p"): 5}, {ord("o"): 5}, {ord("s"): 5}, {EOS: 5, ord("i"): 1}]
    assert _run(_choice_req(choices), steps).text == "pos"
    steps = [{ord("p"): 5}, {ord("o"): 5}, {ord("s"): 5}, {ord("i"): 5}] + [{}] * 4
    assert _run(_choice_req(choices), steps).text == "positive"


def test_choices_finish_when_out_of_room() -> None:
    req = _choice_req(("alpha", "beta"))
    req.max_new_tokens = 2
    r = _run(req, [{ord("b"): 5}, {}])
    assert (r.text, r.finish_reason) == ("beta", "length")


def test_empty_choices_rejected() -> None:
    with pytest.raises(ValueError):
        ChoiceTrie((), _Tok().encode)


class _CharTok(_Tok):
    """The toy tokenizer with the constraint-builder interface (128 one-char tokens)."""

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def token_strings(self) -> list[str]:
        return [chr(i) for i in range(128)]


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["pos", "positive", "neg"]},
        "score": {"type": "integer"},
        "ratio": {"type": "number"},
        "ok": {"type": "boolean"},
        "why": {"type": "string"},
        "meta": {"type": "object", "properties": {"n": {"type": "null"}, "c": {"const": 3}}},
    },
}


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_parses(seed: int) -> None:
    import json

    from llmql.engine.constrained import ConstraintBuilder

    tok = _CharTok()
    req = _req(max_tokens=140, json_schema=SCHEMA)
    req.constraint = ConstraintBuilder(tok).json_schema(SCHEMA, req.max_new_tokens)
    sampler, out = Sampler(), OutputProcessor(tok)
    gen = torch.Generator().manual_seed(seed)
    while not req.finished:
        out(req, sampler.sample([req], torch.randn(1, 128, generator=gen) * 3)[0])
    value = json.loads(req.text)
    assert req.finish_reason == "stop" and list(value) == list(SCHEMA["properties"])
    assert value["label"] in ("pos", "positive", "neg") and isinstance(value["score"], int)
    assert isinstance(value["ratio"], (int, float)) and isinstance(value["ok"], bool)
    assert isinstance(value["why"], str) and value["meta"] == {"n": None, "c": 3}


def test_json_schema_unsupported() -> None:
    from llmql.engine.constrained import compile_schema

    with pytest.raises(ValueError, match="unsupported"):
        compile_schema({"type": "array", "items": {"type": "string"}})
    assert compile_schema({"type": "integer"}) == [("integer",)]
