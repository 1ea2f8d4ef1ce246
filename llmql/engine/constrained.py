"""Constrained decoding: `choices` over a token trie of the allowed strings.

Each choice is tokenized as a continuation (no BOS). Decoding walks the trie: the logits
are masked to the current node's children, and generation ends at a leaf. When a choice is
a prefix of another, its node is both an end and an inner node: there the EOS tokens are
allowed too, and sampling one of them selects the shorter choice. The result text is the
choice string itself, so it is always exactly one of the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class Constraint(Protocol):
    """A decoding constraint: allowed next tokens, consumed token by token."""

    done: bool

    @property
    def text(self) -> str | None: ...  # the final text if the constraint fixes it
    def allowed(self) -> list[int] | torch.Tensor: ...
    def advance(self, token: int) -> None: ...
    def finish_now(self) -> str | None: ...


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    choice: str | None = None  # set where a choice ends


class ChoiceTrie:
    """Token trie of `choices`; `start()` gives a fresh decoding state."""

    def __init__(
        self,
        choices: Sequence[str],
        encode: Callable[[str], list[int]],
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        if not choices:
            raise ValueError("choices must hold at least one string")
        self.root = _TrieNode()
        self.eos_ids = eos_ids
        self.first_tokens: dict[str, int] = {}  # choice -> its first token id
        for choice in choices:
            node = self.root
            tokens = encode(choice)
            if tokens:
                self.first_tokens.setdefault(choice, tokens[0])
            for tok in tokens:
                node = node.children.setdefault(tok, _TrieNode())
            if node.choice is None:
                node.choice = choice

    def start(self) -> ChoiceState:
        """A decoding state at the root."""
        return ChoiceState(self, self.root)


@dataclass
class ChoiceState:
    """Where decoding stands in a `ChoiceTrie`."""

    trie: ChoiceTrie
    node: _TrieNode
    done: bool = False

    def allowed(self) -> list[int]:
        """Token ids allowed next (children, plus EOS where a choice may end here)."""
        allowed = list(self.node.children)
        if self.node.choice is not None:
            allowed.extend(self.trie.eos_ids)
        return allowed

    def advance(self, token: int) -> None:
        """Consume `token`; sets `done` at a leaf or when EOS ends a choice."""
        child = self.node.children.get(token)
        if child is None:
            if self.node.choice is None or token not in self.trie.eos_ids:
                raise ValueError(f"token {token} is not allowed by the choices trie")
            self.done = True
            return
        self.node = child
        self.done = not child.children

    @property
    def text(self) -> str | None:
        """The choice reached (None until one is)."""
        return self.node.choice

    def first_token_logprobs(self, logits: torch.Tensor) -> dict[str, float]:
        """Per choice, the log-softmax of `logits` [vocab] over the choices' distinct first
        tokens, at its first token."""
        import torch

        tokens = sorted(set(self.trie.first_tokens.values()))
        if not tokens:
            return {}
        logprobs = torch.log_softmax(logits[tokens].float(), dim=-1)
        at = {t: float(v) for t, v in zip(tokens, logprobs)}
        return {c: at[t] for c, t in self.trie.first_tokens.items()}

    def finish_now(self) -> str:
        """Complete to a choice without the model (greedy on the first branch)."""
        node = self.node
        while node.choice is None:
            node = next(iter(node.children.values()))
        return node.choice


# -- JSON schema ---------------------------------------------------------------------------
# A schema compiles to a template: literal text (forced token by token) and value slots.
# Supported: object (all properties, in declared order), string, integer, number, boolean,
# null, enum, const, nested objects. Output is compact-ish JSON: {"a": 1, "b": "x"}.

_MAX_DIGITS = 16  # NOTE: digit tokens per number run (integer part and fraction each)


def compile_schema(schema: dict) -> list[tuple]:
    """Schema -> template parts with literal text (not yet tokenized).

    Raises:
        ValueError: for a schema outside the supported subset.
    """
    parts: list[tuple] = []
    _emit(schema, parts)
    merged: list[tuple] = []
    for part in parts:
        if part[0] == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + part[1])
        else:
            merged.append(part)
    return merged


def _emit(schema: dict, out: list[tuple]) -> None:
    import json

    if "const" in schema:
        out.append(("lit", json.dumps(schema["const"])))
    elif "enum" in schema:
        out.append(("enum", tuple(json.dumps(v) for v in schema["enum"])))
    elif schema.get("type") == "object":
        props = schema.get("properties") or {}
        out.append(("lit", "{"))
        for i, (key, sub) in enumerate(props.items()):
            out.append(("lit", (", " if i else "") + json.dumps(key) + ": "))
            _emit(sub, out)
        out.append(("lit", "}"))
    elif schema.get("type") == "string":
        out += [("lit", '"'), ("string",), ("lit", '"')]
    elif schema.get("type") in ("integer", "number"):
        out.append((schema["type"],))
    elif schema.get("type") == "boolean":
        out.append(("enum", ("true", "false")))
    elif schema.get("type") == "null":
        out.append(("lit", "null"))
    else:
        raise ValueError(f"json_schema: unsupported schema {schema!r}")


class JsonVocab:
    """Per-tokenizer token classes for JSON slots (bool masks over the vocabulary)."""

    def __init__(self, token_strings: list[str], special_ids: frozenset[int]) -> None:
        import torch

        def mask(ok: Callable[[str], bool]) -> torch.Tensor:
            return torch.tensor([bool(s) and i not in special_ids and ok(s)
                                 for i, s in enumerate(token_strings)])

        self.string = mask(lambda s: '"' not in s and "\\" not in s and "\ufffd" not in s
                           and all(c >= " " for c in s))
        self.digits = mask(lambda s: s.isascii() and s.isdigit())
        self.dot = [i for i, s in enumerate(token_strings) if s == "."]
        self.minus = [i for i, s in enumerate(token_strings) if s == "-"]


class JsonSchemaState:
    """Decoding state for one `json_schema` request (see `compile_schema`).

    Literals are forced; a string slot allows tokens without quotes, backslashes or control
    characters until the closing literal's first token; number slots allow digits (a
    leading minus, one decimal point for "number"). When the token budget runs low, open
    slots are closed so the JSON still completes.
    """

    def __init__(self, parts: list[tuple], encode: Callable[[str], list[int]], vocab: JsonVocab,
                 eos_ids: frozenset[int], budget: int) -> None:
        self.parts = [("lit", encode(p[1])) if p[0] == "lit" else p for p in parts]
        self.parts = [p for p in self.parts if p[0] != "lit" or p[1]]
        self.encode, self.vocab, self.eos_ids, self.budget = encode, vocab, eos_ids, budget
        self.idx, self.pos, self.digits, self.dot, self.done = 0, 0, 0, False, False
        self.enum: ChoiceState | None = None

    @property
    def text(self) -> None:
        """None: the caller decodes the generated tokens."""
        return None

    def _terminators(self) -> list[int]:
        nxt = self.parts[self.idx + 1] if self.idx + 1 < len(self.parts) else None
        return [nxt[1][0]] if nxt is not None and nxt[0] == "lit" else sorted(self.eos_ids)

    def _needed(self) -> int:
        """Tokens the rest of the template takes at most, after this slot (slots: minimal)."""
        sizes = {"lit": lambda p: len(p[1]), "string": lambda p: 0, "integer": lambda p: 1,
                 "number": lambda p: 1, "enum": lambda p: max(len(self.encode(o)) for o in p[1])}
        return sum(sizes[p[0]](p) for p in self.parts[self.idx + 1 :])

    def allowed(self) -> list[int] | torch.Tensor:
        """Token ids allowed next (a list, or an int64 tensor for large sets)."""
        import torch

        kind = self.parts[self.idx][0]
        if kind == "lit":
            return [self.parts[self.idx][1][self.pos]]
        if kind == "enum":
            return self._enum_state().allowed()
        ends = self._terminators()
        closing = self.budget <= self._needed() + 1
        if kind == "string":
            return ends if closing else torch.cat([self.vocab.string.nonzero()[:, 0],
                                                   torch.tensor(ends)])
        if self.digits and (closing or self.digits >= _MAX_DIGITS):
            return ends
        body = self.vocab.digits.nonzero()[:, 0].tolist()
        if not self.digits and not self.dot:
            body += self.vocab.minus
        elif kind == "number" and self.digits and not self.dot:
            body += self.vocab.dot
        return body + (ends if self.digits else [])

    def advance(self, token: int) -> None:
        """Consume `token`; sets `done` after the template's last token."""
        self.budget -= 1
        kind = self.parts[self.idx][0]
        if kind == "lit":
            self.pos += 1
            if self.pos == len(self.parts[self.idx][1]):
                self._next(0)
        elif kind == "enum":
            self._advance_enum(token)
        elif token in self._terminators():
            self._next(1)
        elif token in self.vocab.dot:
            self.dot, self.digits = True, 0  # NOTE: a digit must follow the point
        elif token not in self.vocab.minus:
            self.digits += 1

    def _enum_state(self) -> ChoiceState:
        if self.enum is None:
            trie = ChoiceTrie(self.parts[self.idx][1], self.encode, frozenset(self._terminators()))
            self.enum = trie.start()
        return self.enum

    def _advance_enum(self, token: int) -> None:
        state = self._enum_state()
        ended_by_next = token not in state.node.children
        state.advance(token)
        if state.done:
            self.enum = None
            self._next(1 if ended_by_next else 0)

    def finish_now(self) -> None:
        """JSON cannot be completed without the model: the caller keeps the partial text."""
        return None

    def _next(self, pos: int) -> None:
        """Move past the current part; `pos` tokens of the following literal are emitted."""
        self.idx, self.pos, self.digits, self.dot = self.idx + 1, 0, 0, False
        if pos and self.idx < len(self.parts):
            self.pos = pos
            if self.pos == len(self.parts[self.idx][1]):
                self.idx, self.pos = self.idx + 1, 0
        self.done = self.idx >= len(self.parts)


class ConstraintBuilder:
    """Builds request constraints for one tokenizer, caching tries and the JSON vocab."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._tries: dict[tuple[str, ...], ChoiceTrie] = {}
        self._vocab: JsonVocab | None = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def choices(self, choices: Sequence[str]) -> ChoiceState:
        key = tuple(choices)
        if key not in self._tries:
            self._tries[key] = ChoiceTrie(key, self.encode, self.tokenizer.eos_ids)
        return self._tries[key].start()

    def json_schema(self, schema: dict, budget: int) -> JsonSchemaState:
        """Raises ValueError for an unsupported schema."""
        parts = compile_schema(schema)
        if self._vocab is None:
            self._vocab = JsonVocab(self.tokenizer.token_strings(), _special_ids(self.tokenizer))
        return JsonSchemaState(parts, self.encode, self._vocab, self.tokenizer.eos_ids, budget)


def _special_ids(tokenizer) -> frozenset[int]:
    """Special (control) token ids: never part of generated JSON text."""
    backend = getattr(tokenizer, "backend", None)
    decoder = backend.get_added_tokens_decoder() if backend is not None else {}
    return frozenset(i for i, t in decoder.items() if t.special) | tokenizer.eos_ids
