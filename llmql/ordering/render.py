"""The one field renderer: how a value, and a `field: value` line, read in a prompt.

The udfs render prompts with it and the ordering code measures and bounds prefix reuse with
it, so the metrics describe the text that is really sent.
"""

from __future__ import annotations

import json
import math
from typing import Any


def render_value(value: Any) -> str:
    """One field value as prompt text, on one line.

    >>> render_value(3.0), render_value(0.5), render_value({"a": [1]}), render_value(" x \\n y ")
    ('3', '0.5', '{"a": [1]}', 'x y')
    """
    if isinstance(value, float):
        text = str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return " ".join(text.split())


def render_cell(value: Any) -> str:
    """`render_value`, with NULL rendered as `null`."""
    return "null" if value is None else render_value(value)


def render_field(name: str, value: Any) -> str:
    """One prompt line (without its newline): `name: value`.

    >>> render_field("year", 2009.0)
    'year: 2009'
    """
    return f"{name}: {render_cell(value)}"
