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
        for choice in choices:
            node = self.root
            for tok in encode(choice):
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

    def finish_now(self) -> str:
        """Complete to a choice without the model (greedy on the first branch)."""
        node = self.node
        while node.choice is None:
            node = next(iter(node.children.values()))
        return node.choice
