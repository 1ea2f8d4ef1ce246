"""An upper bound on the prefix hit count (PHC) of any ordering of a table's prompts.

No row order and no choice of per-row field orders can share more characters with the
previous prompt than `phc_upper_bound` returns, so it says how far an ordering is from the
best possible one (the benchmarks print it next to GGR's figures).

Row r shares with its predecessor p a run of whole `field: value` lines equal in both (the
same field, the same value), then part of one more line. Two relaxations give the bound:

- per value: of the c rows holding a value in a field, at most c - 1 follow a row holding it
  too; each row adds at most one partial line (its field name plus the longest prefix its
  value shares with another value of the field);
- per key field k: at most (rows of a k-group) - 1 rows follow a row of their own group; such
  a row shares at most the best pairwise run with a group member (computed exactly), any other
  at most the lines whose values also occur outside its group, plus one partial line.

The result is the smallest of these bounds, plus the instruction line every prompt shares.
Assumes, as the udfs' rendering gives, that field names contain no ": " and that a line's
match ends at the first field where the two prompts differ (when a value continues another
value past a newline, that row is bounded by its whole length).
"""

from __future__ import annotations

import numpy as np

from llmql.ordering.encoding import to_arrow
from llmql.ordering.metrics import lcp
from llmql.ordering.render import render_cell

HEAD = 16  # characters compared pairwise; longer matches fall back to the per-value bound
MAX_PAIRS = 4_000_000  # key fields whose groups need more pair comparisons are skipped


def phc_upper_bound(table, fields: list[str] | None = None, *, instruction: str = "") -> int:
    """Characters shared with the previous prompt, at most, over every ordering of `table`.

    Prompts are rendered as `metrics.render_prompts` renders them.

    >>> import pandas as pd
    >>> phc_upper_bound(pd.DataFrame({"a": ["x", "x"], "b": ["1", "2"]}))  # "\\na: x\\nb: "
    9
    """
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    n = arrow.num_rows
    if n < 2 or not fields:
        return max(n - 1, 0) * (len(instruction) + 1)
    t = _Cells.build(arrow, fields)
    best = t.per_value_bound()
    for k in range(len(fields)):
        sizes = np.bincount(t.codes[:, k])
        if int((sizes.astype(np.int64) ** 2).sum()) <= MAX_PAIRS:
            best = min(best, t.keyed_bound(k))
    return int(best) + (n - 1) * (len(instruction) + 1)


class _Cells:
    """Per cell: value code, rendered line length, partial-line bound; per code: its head."""

    def __init__(self, codes, length, partial, heads, names, counts):
        self.codes, self.length, self.partial = codes, length, partial
        self.heads, self.names, self.counts = heads, names, counts

    @classmethod
    def build(cls, arrow, fields: list[str]) -> _Cells:
        n, m = arrow.num_rows, len(fields)
        codes = np.zeros((n, m), dtype=np.int64)
        length = np.zeros((n, m), dtype=np.int64)
        partial = np.zeros((n, m), dtype=np.int64)
        heads, counts = [], []
        for j, f in enumerate(fields):
            text = np.array([render_cell(v) + "\n" for v in arrow.column(f).to_pylist()], dtype=object)
            values, inv, count = np.unique(text, return_inverse=True, return_counts=True)
            near = np.zeros(len(values), dtype=np.int64)
            for i in range(len(values) - 1):  # NOTE: the most-sharing other value is a sorted neighbour
                s = lcp(values[i], values[i + 1])
                near[i], near[i + 1] = max(near[i], s), s
            whole = np.array([len(v) for v in values])
            overflow = near >= whole  # one value continues another past its newline
            codes[:, j] = inv.ravel()
            length[:, j] = (len(f) + 2 + whole)[codes[:, j]]
            partial[:, j] = np.where(overflow, -1, len(f) + 2 + near)[codes[:, j]]
            head = np.array([v[:HEAD].ljust(HEAD, "\0") for v in values], dtype=f"U{HEAD}")
            heads.append(head.view(np.uint32).reshape(len(values), HEAD))
            counts.append(count)
        row_total = length.sum(1, keepdims=True)
        partial = np.where(partial < 0, row_total, partial)
        names = np.array([len(f) + 2 for f in fields])
        return cls(codes, length, partial, heads, names, counts)

    def per_value_bound(self) -> int:
        """Σ over values of (rows holding it - 1) × its line, plus one partial line per row."""
        repeats = sum(
            int(((self.counts[j] - 1) * np.bincount(self.codes[:, j], weights=self.length[:, j])
                 / self.counts[j]).sum())
            for j in range(self.codes.shape[1])
        )
        partial = self.partial.max(1)
        return repeats + int(partial.sum() - partial.min())  # the first prompt shares nothing

    def keyed_bound(self, k: int) -> int:
        """The bound with rows grouped by field k's value (see the module docstring)."""
        n, m = self.codes.shape
        group = self.codes[:, k]
        outside = np.zeros((n, m), dtype=bool)  # the cell's value also occurs in another group
        for j in range(m):
            pairs = np.unique(self.codes[:, j] * (group.max() + 1) + group)
            groups_per_value = np.bincount(pairs // (group.max() + 1), minlength=len(self.counts[j]))
            outside[:, j] = groups_per_value[self.codes[:, j]] > 1
        cross = (outside * self.length).sum(1) + self.partial.max(1)
        same = np.full(n, -1, dtype=np.int64)
        order = np.argsort(group, kind="stable")
        starts = np.searchsorted(group[order], np.arange(group.max() + 2))
        for g in range(group.max() + 1):
            members = order[starts[g] : starts[g + 1]]
            if len(members) > 1:
                same[members] = self._best_pair(members)
        best = np.maximum(same, cross)
        loss = np.maximum(same - cross, 0)
        first_loss = np.full(group.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(first_loss, group, loss)
        first_best = np.full(group.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(first_best, group, best)
        # NOTE: one group also holds the first prompt, which shares nothing
        return int(best.sum() - first_loss.sum() - (first_best - first_loss).min())

    def _best_pair(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the most it can share with another of `rows` (equal lines + one partial)."""
        codes, length = self.codes[rows], self.length[rows]
        eq = codes[:, None, :] == codes[None, :, :]
        run = (eq * length[:, None, :]).sum(2)
        part = np.zeros(run.shape, dtype=np.int64)
        for j in range(codes.shape[1]):
            h = self.heads[j][codes[:, j]]
            common = np.cumprod(h[:, None, :] == h[None, :, :], axis=2).sum(2)
            whole = (length[:, j] - self.names[j])[:, None]
            p = np.where((common >= HEAD) | (common >= whole), self.partial[rows, j][:, None], self.names[j] + common)
            part = np.maximum(part, np.where(eq[:, :, j], 0, p))
        total = run + part
        np.fill_diagonal(total, -1)
        return total.max(1)
