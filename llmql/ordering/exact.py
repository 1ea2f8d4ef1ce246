"""Exact prefix-sharing optimum for small tables (rows and per-row field orders)."""

from __future__ import annotations

from functools import cache

import numpy as np

Segment = tuple[list[int], tuple[int, ...]]  # rows in send order, field order shared by them


def solve_exact(codes: np.ndarray, length: np.ndarray, rows: list[int], cols: tuple[int, ...]) -> tuple[int, list[Segment]]:
    """Maximise the characters each prompt shares with the previous one (whole field matches).

    Sending rows in depth-first order of a trie makes each prompt share with its predecessor
    all it shares with any earlier prompt, so the optimum is the best trie: recursively,
    the first row either stands alone or leads a block sharing one field value, which
    comes first in the block's prompts. Exponential; meant for about 8 rows or fewer.

    Args:
        codes: (rows, fields) value codes.
        length: (rows, fields) rendered length of each cell.
        rows: the row indices (into `codes`) to order.
        cols: the field indices still free.

    Returns:
        (shared characters, segments); a segment's field order lists only `cols`.
    """

    @cache
    def best(rs: tuple[int, ...], cs: tuple[int, ...]) -> tuple[int, tuple]:
        if len(rs) <= 1 or not cs:
            return 0, ((rs, ()),) if rs else ()
        for c in cs:  # NOTE: a value every row shares can go first at no loss
            if all(codes[r, c] == codes[rs[0], c] for r in rs[1:]):
                inner, plan = best(rs, tuple(x for x in cs if x != c))
                gain = (len(rs) - 1) * int(length[rs[0], c])
                return gain + inner, tuple((r, (c, *o)) for r, o in plan)
        head, rest = rs[0], rs[1:]
        score, plan = best(rest, cs)
        top = (score, (((head,), ()), *plan))
        for c in cs:
            mates = [r for r in rest if codes[r, c] == codes[head, c]]
            for mask in range(1, 1 << len(mates)):
                chosen = tuple(m for k, m in enumerate(mates) if mask >> k & 1)
                inner, inner_plan = best((head, *chosen), tuple(x for x in cs if x != c))
                outer, outer_plan = best(tuple(r for r in rest if r not in chosen), cs)
                total = len(chosen) * int(length[head, c]) + inner + outer
                if total > top[0]:
                    block = tuple((seg_rows, (c, *order)) for seg_rows, order in inner_plan)
                    top = (total, (*block, *outer_plan))
        return top

    score, plan = best(tuple(rows), tuple(cols))
    return score, [(list(r), _complete(o, cols)) for r, o in plan]


def _complete(order: tuple[int, ...], cols: tuple[int, ...]) -> tuple[int, ...]:
    return (*order, *(c for c in cols if c not in order))
