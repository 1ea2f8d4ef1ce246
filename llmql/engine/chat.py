"""Chat templates: a text prompt rendered as one user turn through the model's template.

The embedded engine calls `resolve_chat` on every request with `chat=True`; the rendered
prompt becomes token ids (the template writes BOS itself, so none is added twice). The
remote backend sends such requests to the server's chat endpoint instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from llmql.engine.tokenizer import Tokenizer
from llmql.engine.types import GenerationRequest


def has_chat_template(engine: Any) -> bool:
    """Whether `engine` serves a model with a chat template: an embedded model's tokenizer
    has one, or another engine says so (`serves_chat_template`: the remote backend, when
    the server tells; `llmql serve` does)."""
    tokenizer = getattr(getattr(engine, "lm", None), "tokenizer", None)
    if tokenizer is not None:
        return bool(getattr(tokenizer, "chat_template", None))
    return getattr(engine, "serves_chat_template", False) is True


def render_messages(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` rendered through the template, with the generation cue.

    Raises:
        ValueError: the model has no chat template, or the template rejects the messages.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id, *ids]  # type: ignore[list-item]
    return ids


def resolve_chat(tokenizer: Tokenizer, request: GenerationRequest) -> GenerationRequest:
    """`request` with a chat prompt rendered to token ids (unchanged if `chat` is False).

    A request that cannot be rendered (no template, a token-id prompt, a template that
    rejects it) comes back unchanged, `chat` still True: the engine fails it as a bad request.
    """
    if not request.chat or not isinstance(request.prompt, str) or not tokenizer.chat_template:
        return request
    try:
        ids = render_messages(tokenizer, [{"role": "user", "content": request.prompt}])
    except ValueError:
        return request
    return dataclasses.replace(request, prompt=ids, chat=False)
