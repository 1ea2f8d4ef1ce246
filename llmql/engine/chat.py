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
    """Whether `engine` (embedded) holds a model with a chat template (remote: False)."""
    tokenizer = getattr(getattr(engine, "lm", None), "tokenizer", None)
    return bool(getattr(tokenizer, "chat_template", None))


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

    Raises:
        ValueError: `chat=True` on a model without a chat template, or a token-id prompt.
    """
    if not request.chat:
        return request
    if not isinstance(request.prompt, str):
        raise ValueError("chat=True needs a text prompt, not token ids")
    ids = render_messages(tokenizer, [{"role": "user", "content": request.prompt}])
    return dataclasses.replace(request, prompt=ids, chat=False)
