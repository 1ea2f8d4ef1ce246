"""CallSpec owns its behaviour: rendering, engine requests, parsing; the optimizer builds it."""

from __future__ import annotations

import pytest

from llmql.optimizer import plan
from llmql.udfs import CallOptions, CallSpec, OutputParseError, UDFError


def test_render_request_parse_of_one_call():
    spec = CallSpec("llm_score", "Rate it.", ("title", "year"), CallOptions(lo=1, hi=3))
    prompt = spec.render({"title": " Up ", "year": 2009.0}, ["year", "title"])
    assert prompt == "Rate it.\nyear: 2009\ntitle: Up\nAnswer with an integer from 1 to 3:"
    request = spec.request(prompt)
    assert request.choices == ("1", "2", "3") and request.prompt == prompt
    assert spec.parse(" 2.") == 2
    with pytest.raises(OutputParseError):
        spec.parse("7")


def test_extract_request_can_drop_the_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    spec = CallSpec("llm_extract", "Count.", ("t",), CallOptions(json_schema=schema))
    assert spec.request("p").json_schema == schema
    assert spec.request("p", json_schema=False).json_schema is None


def test_the_optimizer_builds_the_udfs_spec_with_defaults_under_call_options():
    call = plan("SELECT llm_filter('Kids?', title, max_tokens := 3) FROM movies").calls[0]
    spec = call.spec({"max_tokens": 9, "model": "m"})
    assert spec == CallSpec("llm_filter", "Kids?", ("title",), CallOptions(max_tokens=3, model="m"))
    with pytest.raises(UDFError, match="unknown option"):
        call.spec({"nope": 1})
