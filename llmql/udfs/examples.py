"""Few-shot examples of a call: checked once, rendered as a prefix every row shares.

An example is a mapping of the call's field names to values plus an `answer`. The prompt
shows them after the instruction and before the row's fields, each as the same `field: value`
lines, the answer cue and the answer, in the call's *written* field order: the per-row field
reordering never touches them, so they stay part of the prefix the engine shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmql.ordering.render import render_field, render_value
from llmql.udfs.types import ANSWER, UDFError


def answer_text(function: str, answer: Any) -> str:
    """An example's answer as the text the model should produce (llm_filter: yes/no)."""
    if function == "llm_filter":
        if isinstance(answer, bool):
            return "yes" if answer else "no"
        return render_value(answer).lower()
    return render_value(answer)


def check(
    examples: Sequence[Mapping[str, Any]] | None,
    function: str,
    fields: Sequence[str],
    choices: Sequence[str] | None,
) -> None:
    """Check every example names exactly the call's fields and answers with a choice.

    Raises:
        UDFError: an unknown or missing field, or an answer that is not one of `choices`.
    """
    for i, example in enumerate(examples or (), 1):
        names = set(example) - {ANSWER}
        unknown = sorted(names - set(fields))
        missing = [f for f in fields if f not in names]
        if unknown or missing:
            raise UDFError(
                f"{function}: examples[{i}] must name the call's fields {list(fields)} plus "
                f"{ANSWER!r}; unknown {unknown}, missing {missing}"
            )
        text = answer_text(function, example[ANSWER])
        if choices and text not in choices:
            raise UDFError(
                f"{function}: examples[{i}] answer {example[ANSWER]!r} is not one of "
                f"{list(choices)}"
            )


def render(
    examples: Sequence[Mapping[str, Any]] | None, function: str, fields: Sequence[str], cue: str
) -> list[str]:
    """Prompt lines of the examples, in the written field order, each block ending in a blank
    line (empty without examples)."""
    lines: list[str] = []
    for example in examples or ():
        lines.extend(render_field(name, example[name]) for name in fields)
        lines.append(f"{cue} {answer_text(function, example[ANSWER])}")
        lines.append("")
    return lines


def signature(examples: Sequence[Mapping[str, Any]]) -> list[list[list[str]]]:
    """The examples as cache-key data: each as sorted (name, rendered value) pairs."""
    return [sorted((k, render_value(v)) for k, v in e.items()) for e in examples]
