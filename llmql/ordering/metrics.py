"""Prefix-reuse metrics: prefix hit count (PHC) against the previous prompt, and the trie bound.

PHC (Liu et al., MLSys 2025) counts, over prompts in send order, the characters (or tokens)
each prompt shares as a prefix with the one before it: what a cache holding only the last
prompt reuses. The trie bound counts what each prompt shares with *any* earlier prompt:
the reuse of a cache of unbounded size.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmql.ordering.encoding import to_arrow
from llmql.ordering.render import render_field
from llmql.ordering.types import Ordering


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class PrefixMetrics:
    """Reuse of a prompt sequence, in characters or tokens."""

    total: int  # characters (tokens) over all prompts
    hits: int  # PHC: shared with the previous prompt
    trie_hits: int  # shared with the best earlier prompt (cache of unbounded size)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    @property
    def trie_hit_rate(self) -> float:
        return self.trie_hits / self.total if self.total else 0.0


def render_prompt(instruction: str, fields: Sequence[str], values: Sequence[Any]) -> str:
    """The prompt layout the udfs use: the instruction, then one `field: value` line per field.

    >>> render_prompt("Rate it.", ["title", "year"], ["Up", 2009])
    'Rate it.\\ntitle: Up\\nyear: 2009\\n'
    """
    return f"{instruction}\n" + "".join(f"{render_field(f, v)}\n" for f, v in zip(fields, values))


def render_prompts(table, ordering: Ordering | None = None, *, instruction: str = "",
                   fields: list[str] | None = None) -> list[str]:
    """Prompts of a table in `ordering` (default: table order, fields as given)."""
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    columns = {f: arrow.column(f).to_pylist() for f in fields}
    if ordering is None:
        ordering = Ordering(list(range(arrow.num_rows)), [fields] * arrow.num_rows)
    return [
        render_prompt(instruction, order, [columns[f][r] for f in order])
        for r, order in zip(ordering.row_order, ordering.field_orders)
    ]


def prefix_metrics(prompts: Sequence[str], tokenizer: Tokenizer | None = None) -> PrefixMetrics:
    """PHC and trie bound of prompts in send order; in tokens when a tokenizer is given.

    >>> m = prefix_metrics(["ab\\nx", "ab\\ny", "ab\\nx"])
    >>> (m.total, m.hits, m.trie_hits)
    (12, 6, 7)
    """
    seqs: list[Any] = [tokenizer.encode(p) for p in prompts] if tokenizer else list(prompts)
    total = sum(len(s) for s in seqs)
    hits = sum(lcp(a, b) for a, b in itertools.pairwise(seqs))
    return PrefixMetrics(total=total, hits=hits, trie_hits=_trie_hits(seqs))


def measure(table, ordering: Ordering | None = None, *, instruction: str = "",
            fields: list[str] | None = None, tokenizer: Tokenizer | None = None) -> PrefixMetrics:
    """`prefix_metrics` of a table's prompts rendered in `ordering`."""
    return prefix_metrics(render_prompts(table, ordering, instruction=instruction, fields=fields), tokenizer)


def _trie_hits(seqs: list) -> int:
    """Σ over prompts of the longest prefix shared with any earlier prompt.

    NOTE: the earlier prompt sharing most is a neighbour in sorted order, so a sorted list
    replaces the trie.
    """
    seen: list = []
    total = 0
    for s in seqs:
        key = tuple(s) if isinstance(s, list) else s
        i = bisect.bisect_left(seen, key)
        best = max((lcp(key, seen[j]) for j in (i - 1, i) if 0 <= j < len(seen)), default=0)
        total += best
        seen.insert(i, key)
    return total


def lcp(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
