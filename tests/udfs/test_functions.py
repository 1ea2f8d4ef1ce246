"""Output parsing per function and the simple JSON-schema support of llm_extract."""

from __future__ import annotations

import pyarrow as pa
import pytest

from llmql.udfs import jsonschema
from llmql.udfs.functions import get_spec
from llmql.udfs.types import CallOptions, OutputParseError, UDFError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "year": {"type": "integer"},
        "score": {"type": "number"},
        "kids": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name"],
}


@pytest.mark.parametrize(("text", "value"), [("yes", True), (" No.", False), ("Yes, it is", True)])
def test_filter_parse(text, value):
    assert get_spec("llm_filter").parse(text, CallOptions()) is value


def test_filter_parse_rejects_other_words():
    with pytest.raises(OutputParseError):
        get_spec("llm_filter").parse("maybe", CallOptions())


def test_classify_and_score_parse():
    opts = CallOptions(labels=("positive", "negative"))
    assert get_spec("llm_classify").parse("Negative.", opts) == "negative"
    assert get_spec("llm_classify").parse("it is positive overall", opts) == "positive"
    rng = CallOptions(lo=1, hi=5)
    assert get_spec("llm_score").parse("4 out of 5", rng) == 4
    with pytest.raises(OutputParseError):
        get_spec("llm_score").parse("9", rng)
    assert get_spec("llm_score").choices(rng) == ("1", "2", "3", "4", "5")


def test_extract_parses_and_coerces():
    text = 'Sure: {"name": "Jaws", "year": "1975", "score": 8, "kids": "false", "mood": "sad"}'
    assert jsonschema.parse_and_validate(text, SCHEMA) == {
        "name": "Jaws",
        "year": 1975,
        "score": 8.0,
        "kids": False,
        "mood": "sad",
    }
    assert jsonschema.parse_and_validate('{"name": "x", "year": 3', SCHEMA)["year"] == 3
    for bad in ("no json", '{"year": 1}', '{"name": "x", "mood": "angry"}'):
        with pytest.raises(OutputParseError):
            jsonschema.parse_and_validate(bad, SCHEMA)


def test_extract_arrow_type_and_unsupported_schemas():
    assert jsonschema.arrow_type(SCHEMA).field("year").type == pa.int64()
    with pytest.raises(UDFError):
        jsonschema.check_supported({"type": "object", "properties": {"a": {"type": "array"}}})
    with pytest.raises(UDFError, match="not valid JSON"):
        CallOptions.from_dict({"json_schema": "{nope"})
