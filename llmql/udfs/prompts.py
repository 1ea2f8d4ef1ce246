"""Prompt rendering and the order-independent identity of an input row."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmql.ordering.render import render_field, render_value
from llmql.udfs import examples
from llmql.udfs.fingerprint import adapter_fingerprint
from llmql.udfs.functions import calibrates, get_spec, max_tokens
from llmql.udfs.result_cache import CACHE_FORMAT_VERSION

if TYPE_CHECKING:
    from llmql.udfs.call import CallSpec


def render_prompt(spec: CallSpec, row: Mapping[str, Any], field_order: Sequence[str]) -> str:
    """Instruction, the few-shot examples (in the written field order), then one
    `field: value` line per field in `field_order`, then the cue.

    NOTE: everything before the row's first field line is the same for every row of a call,
    so it is a prefix the engine's cache shares across the whole batch.
    """
    lines = [shared_prefix(spec)]
    lines.extend(render_field(name, row[name]) for name in field_order)
    lines.append(get_spec(spec.function).cue(spec.options))
    return "\n".join(lines)


def shared_prefix(spec: CallSpec) -> str:
    """The text every prompt of a call starts with, up to the newline before the row's first
    field: the instruction and the rendered few-shot examples."""
    cue = get_spec(spec.function).cue(spec.options)
    lines = [spec.instruction.strip()]
    lines.extend(examples.render(spec.options.examples, spec.function, spec.fields, cue))
    return "\n".join(lines)


def output_signature(spec: CallSpec) -> dict[str, Any]:
    """Everything besides the inputs that determines an answer (part of the cache key)."""
    o = spec.options
    signature = {
        "function": spec.function,
        "instruction": spec.instruction,
        "labels": list(o.labels) if o.labels else None,
        "range": [o.lo, o.hi] if spec.function == "llm_score" else None,
        "schema": o.json_schema,
        "max_tokens": max_tokens(spec),
        "temperature": float(o.temperature),
        "adapter": [o.adapter, adapter_fingerprint(o.adapter)] if o.adapter else None,
    }
    if o.temperature > 0:
        signature["seed"] = o.seed  # NOTE: greedy answers do not depend on the seed
    if get_spec(spec.function).choices(o):
        signature["calibrated"] = calibrates(spec)  # NOTE: old (uncalibrated) answers miss
    if o.chat is not None:
        signature["chat"] = o.chat  # NOTE: auto (None) is keyed by the model alone
    if o.reorder_fields:
        signature["fields_reordered"] = True  # NOTE: never mixed with written-order answers
    if o.examples:
        signature["examples"] = examples.signature(o.examples)
    if get_spec(spec.function).stop:
        signature["stop"] = list(get_spec(spec.function).stop)  # NOTE: old unstopped answers miss
    return signature


def null_prompt(spec: CallSpec) -> str:
    """The content-free prompt of a call: the same render with every field value "N/A"."""
    return render_prompt(spec, dict.fromkeys(spec.fields, "N/A"), spec.fields)


def cache_key(model: str, signature: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """A stable hash of (cache format, model identity, call signature, input values by field
    name). `model` is `executor.key_model`'s name with its content fingerprint.

    NOTE: inputs are keyed by field name, sorted, so a row's key does not depend on the field
    order its prompt was rendered in.
    """
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "model": model,
        "call": signature,
        "inputs": sorted((str(k), render_value(v)) for k, v in row.items()),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()

