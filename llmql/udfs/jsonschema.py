"""The simple JSON schemas llm_extract supports: an object of string/number/integer/boolean/enum
properties. Parses a model answer into a dict and validates it; maps the schema to Arrow."""

from __future__ import annotations

import json
import re

import pyarrow as pa

from llmql.udfs.types import OutputParseError, UDFError

_ARROW = {
    "string": pa.string(),
    "number": pa.float64(),
    "integer": pa.int64(),
    "boolean": pa.bool_(),
}


def check_supported(schema: dict) -> None:
    """Raise UDFError unless `schema` is an object whose properties are simple types or enums."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise UDFError('llm_extract json_schema must be {"type": "object", "properties": {...}}')
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise UDFError("llm_extract json_schema needs a non-empty 'properties' object")
    for name, prop in props.items():
        if not isinstance(prop, dict):
            raise UDFError(f"json_schema property {name!r} must be an object")
        if "enum" in prop:
            if not prop["enum"] or not all(isinstance(v, str) for v in prop["enum"]):
                raise UDFError(f"json_schema property {name!r}: enum must list strings")
        elif prop.get("type") not in _ARROW:
            raise UDFError(
                f"json_schema property {name!r}: type must be one of {sorted(_ARROW)} or an enum"
            )


def arrow_type(schema: dict | None) -> pa.DataType:
    """The Arrow struct type of a (supported) schema."""
    check_supported(schema)
    return pa.struct(
        [
            pa.field(n, _ARROW.get(p.get("type"), pa.string()))
            for n, p in schema["properties"].items()
        ]
    )


def cue(schema: dict | None) -> str:
    """The answer cue naming the keys and their types."""
    props = (schema or {}).get("properties", {})
    keys = ", ".join(
        f'"{n}" ({"one of " + "/".join(p["enum"]) if "enum" in p else p.get("type")})'
        for n, p in props.items()
    )
    return f"Answer with a JSON object with keys {keys}:"


def parse_and_validate(text: str, schema: dict) -> dict:
    """The first JSON object in `text`, coerced to the schema; raises OutputParseError."""
    obj = _first_object(text)
    out = {}
    for name, prop in schema["properties"].items():
        value = obj.get(name)
        if value is None:
            if name in schema.get("required", ()):
                raise OutputParseError(f"missing required property {name!r}")
            out[name] = None
            continue
        out[name] = _coerce(name, value, prop)
    return out


def _first_object(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise OutputParseError(f"no JSON object in {text!r}")
    end = text.rfind("}")
    candidates = [text[start : end + 1]] if end > start else []
    candidates.append(text[start:] + "}")  # answers cut off by max_tokens
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    match = re.search(r"\{[^{}]*\}", text)
    if match:
        try:
            return json.loads(match.group())
        except json.JSONDecodeError:
            pass
    raise OutputParseError(f"no valid JSON object in {text!r}")


def _coerce(name: str, value: object, prop: dict) -> object:
    if "enum" in prop:
        if value not in prop["enum"]:
            raise OutputParseError(f"{name}={value!r} is not one of {prop['enum']}")
        return value
    kind = prop["type"]
    try:
        if kind == "string":
            return value if isinstance(value, str) else json.dumps(value)
        if kind == "boolean":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError(value)
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise OutputParseError(f"{name}={value!r} is not a {kind}") from None
