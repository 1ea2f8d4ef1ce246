"""A faithful reference of the paper's GGR (Algorithm 1): the benchmarks' baseline, and the
second candidate `reorder` measures on small tables.

No functional dependencies, no depth limit, no exact solver, no fallback: each step picks
the single (field, value) with the highest hit count len(value)² × (rows with it − 1),
recurses into its rows with the other fields, and continues with the remaining rows.
"""

from __future__ import annotations

import numpy as np

from llmql.ordering.encoding import encode, to_arrow
from llmql.ordering.types import Ordering


def reference_ggr(table, fields: list[str] | None = None) -> Ordering:
    """Order rows and fields with plain GGR (ties: first field, first value seen)."""
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    enc = encode(arrow, fields)
    codes = np.stack(enc.codes, 1)
    out: list[tuple[int, tuple[int, ...]]] = []
    _ggr(codes, enc.length, np.arange(arrow.num_rows), tuple(range(len(fields))), (), out)
    return Ordering([int(r) for r, _ in out], [[fields[c] for c in order] for _, order in out])


def _ggr(codes, length, rows, cols, prefix, out) -> None:
    while len(rows):
        if len(rows) == 1 or not cols:
            out.extend((r, prefix + cols) for r in rows)
            return
        if len(cols) == 1:
            c = cols[0]
            out.extend((r, prefix + cols) for r in rows[np.argsort(codes[rows, c], kind="stable")])
            return
        best = (-1, None, None)
        for c in cols:
            values, first, counts = np.unique(codes[rows, c], return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            hc = (counts[order] - 1) * length[c][values[order]] ** 2
            i = int(np.argmax(hc))
            if hc[i] > best[0]:
                best = (int(hc[i]), c, values[order][i])
        _, c, v = best
        mask = codes[rows, c] == v
        _ggr(codes, length, rows[mask], tuple(x for x in cols if x != c), (*prefix, c), out)
        rows = rows[~mask]
