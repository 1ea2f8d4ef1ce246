"""Row and field reordering for prefix reuse: Greedy Group Recursion (Liu et al., MLSys 2025).

GGR repeatedly picks the (field, value) whose rows share the most prompt text (the paper's
score: squared rendered length × (repeats - 1)), sends that group together with the value
first, and recurses into the group with the other fields and into the remaining rows with
all fields. Additions: fields in one-to-one correspondence (functional dependencies, found
from the data) travel together; every value of the winning field that the greedy would pick
next is taken in one step; small sub-tables are solved exactly; and rows with no repeated
value left are sorted as text, fields ordered by how much their sorted neighbours share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmql.optimizer.encoding import encode, to_arrow
from llmql.optimizer.exact import solve_exact
from llmql.optimizer.fds import discover_fds
from llmql.optimizer.types import Ordering

EXACT_ROWS = 5  # sub-tables this small are solved exactly


def reorder(
    table,
    fields: list[str] | None = None,
    *,
    functional_dependencies: list[list[str]] | None = None,
    exact_rows: int = EXACT_ROWS,
) -> Ordering:
    """Order rows, and fields within each row, so consecutive prompts share long prefixes.

    Args:
        table: a pyarrow Table or pandas DataFrame of distinct inputs.
        fields: the prompt fields (default: all columns).
        functional_dependencies: groups of fields that determine each other; discovered from
            the data when None, none when [].
        exact_rows: sub-tables with at most this many rows are solved exactly.

    Returns:
        An `Ordering`: a permutation of the rows and, per row, a permutation of `fields`.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"review": ["ok", "bad", "fine"], "movie": ["Up", "Heat", "Up"]})
    >>> o = reorder(df)
    >>> o.row_order, o.field_orders[0]
    ([0, 2, 1], ['movie', 'review'])
    """
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    if arrow.num_rows == 0 or not fields:
        return Ordering(row_order=[], field_orders=[])
    encoded = encode(arrow, fields)
    fds = discover_fds(encoded) if functional_dependencies is None else functional_dependencies
    groups = _field_groups(fields, fds)
    tables = _GroupedTable.build(encoded, groups)
    segments = _Greedy(tables, exact_rows).run()
    row_order: list[int] = []
    field_orders: list[list[str]] = []
    for rows, order in segments:
        names = [f for g in order for f in groups[g]]
        row_order.extend(int(r) for r in rows)
        field_orders.extend([list(names) for _ in range(len(rows))])
    return Ordering(row_order=row_order, field_orders=field_orders)


def _field_groups(fields: list[str], fds: Sequence[Sequence[str]]) -> list[list[str]]:
    """Fields grouped by dependency (each group in table order); singletons for the rest."""
    owner = {f: i for i, group in enumerate(fds) for f in group if f in fields}
    groups: dict[object, list[str]] = {}
    for f in fields:
        groups.setdefault(owner.get(f, f), []).append(f)
    return list(groups.values())


@dataclass(frozen=True)
class _GroupedTable:
    """Per field group: cell codes (of its first field), summed lengths, squared-length score."""

    codes: np.ndarray  # (rows, groups) int64
    length: np.ndarray  # (rows, groups) rendered characters of the group's fields
    weight: list[np.ndarray]  # per group, per code: sum of squared field lengths
    rank: list[np.ndarray]  # per group, per code: text order of the first field
    head: list[np.ndarray]  # per group, per code: first characters of the first field

    @classmethod
    def build(cls, enc, groups: list[list[str]]) -> _GroupedTable:
        index = {f: i for i, f in enumerate(enc.fields)}
        codes, length, weight, rank, head = [], [], [], [], []
        for group in groups:
            first = index[group[0]]
            c = enc.codes[first]
            row_len = sum(enc.length[index[f]][enc.codes[index[f]]] for f in group)
            row_sq = sum(enc.length[index[f]][enc.codes[index[f]]] ** 2 for f in group)
            w = np.zeros(len(enc.length[first]), dtype=np.int64)
            w[c] = row_sq  # NOTE: one-to-one groups give every row of a code the same lengths
            codes.append(c)
            length.append(row_len)
            weight.append(w)
            rank.append(enc.rank[first])
            head.append(enc.head[first])
        return cls(np.stack(codes, 1), np.stack(length, 1), weight, rank, head)


class _Greedy:
    """GGR over a `_GroupedTable`, emitting (rows, group order) segments in send order."""

    def __init__(self, table: _GroupedTable, exact_rows: int):
        self.t, self.exact_rows = table, exact_rows
        self.out: list[tuple[np.ndarray, tuple[int, ...]]] = []

    def run(self) -> list[tuple[np.ndarray, tuple[int, ...]]]:
        self.solve(np.arange(len(self.t.codes)), tuple(range(self.t.codes.shape[1])), ())
        return self.out

    def solve(self, rows: np.ndarray, cols: tuple[int, ...], prefix: tuple[int, ...]) -> None:
        while len(rows):
            if len(rows) == 1 or not cols:
                self.out.append((rows, prefix + cols))
                return
            stats = [self._scores(rows, c) for c in cols]
            tops = [s[1].max() if len(s[1]) else 0 for s in stats]
            best = int(np.argmax(tops))
            if tops[best] <= 0:
                self._fallback(rows, cols, prefix)
                return
            if len(rows) <= self.exact_rows:
                self._exact(rows, cols, prefix)
                return
            values, scores = stats[best]
            bar = max((t for i, t in enumerate(tops) if i != best), default=0)
            # NOTE: scores of other fields only fall as rows leave, so every value of the
            # winning field scoring at least their current best is the greedy's next pick.
            picked = values[np.argsort(-scores, kind="stable")]
            picked = picked[: max(1, int((scores >= max(bar, 1)).sum()))]
            c = cols[best]
            picked = picked[np.argsort(self.t.rank[c][picked], kind="stable")]  # neighbours share text
            column = self.t.codes[rows, c]
            rest = tuple(x for x in cols if x != c)
            for v in picked:
                self.solve(rows[column == v], rest, (*prefix, c))
            rows = rows[~np.isin(column, picked)]

    def _scores(self, rows: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        values, counts = np.unique(self.t.codes[rows, c], return_counts=True)
        return values, (counts - 1) * self.t.weight[c][values]

    def _exact(self, rows: np.ndarray, cols: tuple[int, ...], prefix: tuple[int, ...]) -> None:
        idx = list(cols)
        _, segments = solve_exact(self.t.codes[rows][:, idx], self.t.length[rows][:, idx], list(range(len(rows))), tuple(range(len(idx))))
        for local, order in segments:
            self.out.append((rows[local], prefix + tuple(idx[o] for o in order)))

    def _fallback(self, rows: np.ndarray, cols: tuple[int, ...], prefix: tuple[int, ...]) -> None:
        """No value repeats: sort rows as text, fields whose sorted neighbours share most first."""
        affinity = []
        for c in cols:
            codes = self.t.codes[rows, c]
            heads = self.t.head[c][codes[np.argsort(self.t.rank[c][codes], kind="stable")]]
            same = np.cumprod(heads[1:] == heads[:-1], axis=1)
            affinity.append(int(same.sum()))
        order = tuple(c for _, c in sorted(zip(affinity, cols), key=lambda p: -p[0]))
        keys = [self.t.rank[c][self.t.codes[rows, c]] for c in reversed(order)]
        self.out.append((rows[np.lexsort(keys)], prefix + order))
