"""Function specs: answer cue, constrained choices, output type and parser per LLM function."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmql.udfs import examples, jsonschema
from llmql.udfs.types import CallOptions, OutputParseError, UDFError

if TYPE_CHECKING:
    from llmql.udfs.call import CallSpec


@dataclass(frozen=True)
class FunctionSpec:
    """How one LLM function prompts, constrains and parses."""

    name: str
    default_max_tokens: int
    cue: Callable[[CallOptions], str]
    choices: Callable[[CallOptions], tuple[str, ...] | None]
    arrow_type: Callable[[CallOptions], pa.DataType]
    parse: Callable[[str, CallOptions], Any]
    validate: Callable[[CallOptions], None]
    stop: tuple[str, ...] = ()  # generation ends at these strings (not included)


def get_spec(function: str) -> FunctionSpec:
    """The spec of an LLM function by name."""
    try:
        return SPECS[function]
    except KeyError:
        raise UDFError(f"unknown LLM function {function!r}; known: {sorted(SPECS)}") from None


def validate(spec: CallSpec) -> FunctionSpec:
    """Check a call's function-specific options and its few-shot examples; returns its
    FunctionSpec."""
    fn = get_spec(spec.function)
    fn.validate(spec.options)
    examples.check(spec.options.examples, spec.function, spec.fields, fn.choices(spec.options))
    return fn


def max_tokens(spec: CallSpec) -> int:
    """The answer length budget of a call."""
    if spec.options.max_tokens is not None:
        return spec.options.max_tokens
    choices = get_spec(spec.function).choices(spec.options)
    if choices:
        return max(8, max(len(c) for c in choices))
    return get_spec(spec.function).default_max_tokens


def calibrates(spec: CallSpec) -> bool:
    """Whether a call picks its answer by calibrated choice scores (see CallOptions)."""
    o = spec.options
    return bool(o.calibrate and o.temperature == 0 and get_spec(spec.function).choices(o))


def _no_check(options: CallOptions) -> None:
    return None


def _check_labels(options: CallOptions) -> None:
    labels = options.labels
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise UDFError("llm_classify needs a non-empty list of non-empty string labels")
    if len(set(labels)) != len(labels):
        raise UDFError(f"llm_classify labels must be distinct, got {list(labels)}")


def _check_range(options: CallOptions) -> None:
    lo, hi = options.lo, options.hi
    if not isinstance(lo, int) or not isinstance(hi, int) or isinstance(lo, bool):
        raise UDFError(f"llm_score needs integer lo and hi, got {lo!r} and {hi!r}")
    if not lo <= hi or hi - lo > 100:
        raise UDFError(f"llm_score needs lo <= hi with at most 101 values, got {lo}..{hi}")


def _check_schema(options: CallOptions) -> None:
    if options.json_schema is None:
        raise UDFError("llm_extract needs a json_schema")
    jsonschema.check_supported(options.json_schema)


def _parse_text(text: str, options: CallOptions) -> str:
    return text.strip()


def _parse_bool(text: str, options: CallOptions) -> bool:
    word = re.match(r"\W*(\w+)", text.lower())
    token = word.group(1) if word else ""
    if token in ("yes", "true", "y"):
        return True
    if token in ("no", "false", "n"):
        return False
    raise OutputParseError(f"not a yes/no answer: {text!r}")


def _parse_label(text: str, options: CallOptions) -> str:
    labels = options.labels or ()
    clean = text.strip().strip(".\"'").lower()
    for label in labels:
        if clean == label.lower():
            return label
    for label in sorted(labels, key=len, reverse=True):
        if re.search(rf"\b{re.escape(label.lower())}\b", clean):
            return label
    raise OutputParseError(f"not one of {list(labels)}: {text!r}")


def _parse_score(text: str, options: CallOptions) -> int:
    match = re.search(r"-?\d+", text)
    if match is None:
        raise OutputParseError(f"not an integer: {text!r}")
    value = int(match.group())
    if not options.lo <= value <= options.hi:
        raise OutputParseError(f"{value} is outside [{options.lo}, {options.hi}]")
    return value


def _parse_extract(text: str, options: CallOptions) -> dict:
    return jsonschema.parse_and_validate(text, options.json_schema)


def _score_choices(options: CallOptions) -> tuple[str, ...]:
    return tuple(str(i) for i in range(options.lo, options.hi + 1))


SPECS: dict[str, FunctionSpec] = {
    "llm": FunctionSpec(
        "llm",
        48,
        lambda o: "Answer:",
        lambda o: None,
        lambda o: pa.string(),
        _parse_text,
        _no_check,
        # NOTE: a SQL value is one line; base models otherwise run on to max_tokens.
        stop=("\n",),
    ),
    "llm_filter": FunctionSpec(
        "llm_filter",
        2,
        lambda o: "Answer (yes or no):",
        lambda o: ("yes", "no"),
        lambda o: pa.bool_(),
        _parse_bool,
        _no_check,
    ),
    "llm_classify": FunctionSpec(
        "llm_classify",
        8,
        lambda o: f"Answer with one of {', '.join(o.labels or ())}:",
        lambda o: tuple(o.labels or ()),
        lambda o: pa.string(),
        _parse_label,
        _check_labels,
    ),
    "llm_score": FunctionSpec(
        "llm_score",
        4,
        lambda o: f"Answer with an integer from {o.lo} to {o.hi}:",
        _score_choices,
        lambda o: pa.int64(),
        _parse_score,
        _check_range,
    ),
    "llm_extract": FunctionSpec(
        "llm_extract",
        96,
        lambda o: jsonschema.cue(o.json_schema),
        lambda o: None,
        lambda o: jsonschema.arrow_type(o.json_schema),
        _parse_extract,
        _check_schema,
    ),
    "llm_agg": FunctionSpec(
        "llm_agg",
        64,
        lambda o: "Summary:",
        lambda o: None,
        lambda o: pa.string(),
        _parse_text,
        _no_check,
    ),
}
