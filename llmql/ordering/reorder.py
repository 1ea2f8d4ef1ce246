"""Row and field reordering for prefix reuse: Greedy Group Recursion (Liu et al., MLSys 2025).

GGR repeatedly picks the (field, value) whose rows share the most prompt text (the paper's
score: squared rendered length × (repeats - 1)), sends that group together with the value
first, and recurses into the group with the other fields and into the remaining rows with
all fields. Here every open group of one recursion level advances together, vectorised over
a group-id array, so the cost does not grow with the number of small groups. Additions:
fields in one-to-one correspondence (functional dependencies, found from the data) travel
together; every value of the winning field that the greedy would pick next is taken in one
step; small groups may be solved exactly; and groups with no repeated value left (and single
rows) are sorted as text, fields ordered by how much their sorted neighbours share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmql.ordering.encoding import encode, to_arrow
from llmql.ordering.exact import solve_exact
from llmql.ordering.fds import determines, discover_fds
from llmql.ordering.metrics import measure
from llmql.ordering.reference_ggr import reference_ggr
from llmql.ordering.render import render_cell
from llmql.ordering.types import Ordering

EXACT_ROWS = 0  # groups this small are solved exactly (one Python call each)
CHECKED_ROWS = 256  # tables this small also try plain GGR and keep the order that shares more


def reorder(
    table,
    fields: list[str] | None = None,
    *,
    functional_dependencies: list[list[str]] | None = None,
    exact_rows: int = EXACT_ROWS,
    reorder_fields: bool = True,
) -> Ordering:
    """Order rows, and fields within each row, so consecutive prompts share long prefixes.

    Args:
        table: a pyarrow Table or pandas DataFrame of distinct inputs.
        fields: the prompt fields (default: all columns).
        functional_dependencies: groups of fields that determine each other; discovered from
            the data when None, none when [].
        exact_rows: groups with at most this many rows are solved exactly.
        reorder_fields: False keeps `fields` in the given order in every row and only sorts
            the rows (`written_order`): each prompt's text then does not depend on the other
            rows.

    Returns:
        An `Ordering`: a permutation of the rows and, per row, a permutation of `fields`.
        Tables of at most CHECKED_ROWS rows get `greedy_order` or plain GGR, whichever
        shares more characters with the previous prompt (`_best_of`); larger tables get
        `greedy_order`.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"review": ["ok", "bad", "fine"], "movie": ["Up", "Heat", "Up"]})
    >>> o = reorder(df)
    >>> o.row_order, o.field_orders[0]
    ([2, 0, 1], ['movie', 'review'])
    """
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    if not reorder_fields:
        return written_order(arrow, fields)
    ours = greedy_order(arrow, fields, functional_dependencies=functional_dependencies, exact_rows=exact_rows)
    if 0 < len(ours.row_order) <= CHECKED_ROWS:
        return _best_of(arrow, fields, ours)
    return ours


def written_order(table, fields: list[str] | None = None) -> Ordering:
    """Every row's fields as given; rows sorted by their rendered field values in that order
    (the most prefix reuse one fixed field order allows)."""
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    columns = [[render_cell(v) for v in arrow.column(f).to_pylist()] for f in fields]
    texts = list(zip(*columns)) if columns else [()] * arrow.num_rows
    order = sorted(range(arrow.num_rows), key=texts.__getitem__)
    return Ordering(row_order=order, field_orders=[list(fields) for _ in order])


def greedy_order(
    table,
    fields: list[str] | None = None,
    *,
    functional_dependencies: list[list[str]] | None = None,
    exact_rows: int = EXACT_ROWS,
) -> Ordering:
    """The level-wise GGR alone: what `reorder` returns on tables of more than CHECKED_ROWS
    rows (on smaller ones `reorder` also tries plain GGR and keeps the better). Arguments as
    for `reorder`."""
    arrow = to_arrow(table)
    fields = list(fields or arrow.column_names)
    if arrow.num_rows == 0 or not fields:
        return Ordering(row_order=[], field_orders=[])
    encoded = encode(arrow, fields)
    fds = discover_fds(encoded) if functional_dependencies is None else functional_dependencies
    groups = _field_groups(fields, fds)
    grouped = _GroupedTable.build(encoded, groups)
    perm, orders = _with_uniform_order(grouped, *_Levels(grouped, exact_rows).run())
    distinct, which, _ = _distinct_rows(orders)
    names = [[f for g in row for f in groups[g]] for row in distinct.tolist()]
    return Ordering(row_order=perm.tolist(), field_orders=[names[i].copy() for i in which.ravel().tolist()])


def _best_of(arrow, fields: list[str], ours: Ordering) -> Ordering:
    """`ours` or plain GGR, whichever shares more characters with the previous prompt.

    NOTE: on small tables the level-wise greedy's approximations (whole fields, 16-character
    heads) sometimes lose a few characters to plain GGR; measuring both exactly is cheap there.
    """
    ggr = reference_ggr(arrow, fields)
    return ggr if measure(arrow, ggr, fields=fields).hits > measure(arrow, ours, fields=fields).hits else ours


def _field_groups(fields: list[str], fds: Sequence[Sequence[str]]) -> list[list[str]]:
    """Fields grouped by dependency (each group in table order); singletons for the rest."""
    owner = {f: i for i, group in enumerate(fds) for f in group if f in fields}
    groups: dict[object, list[str]] = {}
    for f in fields:
        groups.setdefault(owner.get(f, f), []).append(f)
    return list(groups.values())


@dataclass(frozen=True)
class _GroupedTable:
    """Per field group: cell codes (of its first field), rendered lengths, text ranks."""

    codes: np.ndarray  # (rows, groups) int64
    length: np.ndarray  # (rows, groups) rendered characters of the group's fields
    ranks: np.ndarray  # (rows, groups) text order of the cell among its field's values
    weight: list[np.ndarray]  # per group, per code: sum of squared field lengths
    head: list[np.ndarray]  # per group, per code: first characters of the first field
    name: np.ndarray  # per group: characters of the first field's name and ": "

    @classmethod
    def build(cls, enc, groups: list[list[str]]) -> _GroupedTable:
        index = {f: i for i, f in enumerate(enc.fields)}
        codes, length, ranks, weight, head = [], [], [], [], []
        for group in groups:
            first = index[group[0]]
            c = enc.codes[first]
            w = np.zeros(len(enc.length[first]), dtype=np.int64)
            # NOTE: one-to-one groups give every row of a code the same lengths
            w[c] = sum(enc.length[index[f]][enc.codes[index[f]]] ** 2 for f in group)
            codes.append(c)
            length.append(sum(enc.length[index[f]][enc.codes[index[f]]] for f in group))
            ranks.append(enc.rank[first][c])
            weight.append(w)
            head.append(enc.head[first])
        name = np.array([len(g[0]) + 2 for g in groups])
        return cls(np.stack(codes, 1), np.stack(length, 1), np.stack(ranks, 1), weight, head, name)


@dataclass
class _Round:
    """The open groups of one recursion level: active rows, their group ids, free fields."""

    rows: np.ndarray  # active row ids, any order
    task: np.ndarray  # group id of each active row; ids follow send order
    free: np.ndarray  # (groups, fields) bool: fields not yet placed


class _Levels:
    """GGR over a `_GroupedTable`, all groups of a level at once; returns rows and field orders."""

    def __init__(self, table: _GroupedTable, exact_rows: int):
        self.t, self.exact_rows = table, exact_rows
        n, m = table.codes.shape
        self.order = np.zeros((n, m), dtype=np.int64)  # per row: field groups in send order
        self.depth = np.zeros(n, dtype=np.int64)  # per row: fields placed so far
        self.keys: list[np.ndarray] = []  # per level: each row's place among its siblings
        self.rest = int(table.ranks.max()) + 1  # sibling key of the rows left after a pick
        self.priority = _priority(table)
        distinct = np.array([len(np.unique(table.codes[:, j])) for j in range(m)])
        self.coarser = determines(table.codes) & (distinct[None, :] < distinct[:, None])

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        n, m = self.t.codes.shape
        level = _Round(np.arange(n), np.zeros(n, dtype=np.int64), np.ones((1, m), dtype=bool))
        while len(level.rows):
            self.keys.append(np.zeros(n, dtype=np.int64))
            level = self._step(level)
        perm = np.lexsort(self.keys[::-1])
        return perm, self.order[perm]

    def _step(self, level: _Round) -> _Round:
        """One greedy pick in every open group; closes the groups that need no more picks."""
        rows, task, free = level.rows, level.task, level.free
        size = np.bincount(task, minlength=len(free))
        top, inv, score = self._scores(rows, task, free, size > 1)
        best = top.argmax(1)
        best_score = top[np.arange(len(top)), best]
        top[np.arange(len(top)), best] = -1
        bar = np.maximum(top.max(1), 1)
        done = (size <= 1) | (best_score <= 0) | ~free.any(1)
        tail = done[task]
        if tail.any():
            self._tail(rows[tail], task[tail], free)
        if self.exact_rows > 1:
            done |= self._exact(rows, task, free, done | (size > self.exact_rows))
        closing = done[task]
        c, picked = self._pick(task, ~closing, best, bar, top, inv, score)
        rows, task, c, picked = rows[~closing], task[~closing], c[~closing], picked[~closing]
        sibling = np.where(picked, self.t.ranks[rows, c], self.rest)
        self.keys[-1][rows] = sibling
        self.order[rows[picked], self.depth[rows[picked]]] = c[picked]
        self.depth[rows[picked]] += 1
        _, first, new_task = np.unique(task * (self.rest + 1) + sibling, return_index=True, return_inverse=True)
        new_free = free[task[first]]
        child = picked[first]
        new_free[np.flatnonzero(child), c[first][child]] = False
        return _Round(rows, new_task.ravel(), new_free)

    def _pick(self, task, live, best, bar, top, inv, score):
        """Per live row: the field its group splits on, and whether the row joins a split group.

        The greedy's values of `best` are those scoring at least `bar`. When `best` determines
        a coarser field with repeats, the group splits on that field instead (its values
        that hold a picked row): the finer groups nest inside, and also share the coarser value.
        """
        c = best[task]
        row_score = np.full(len(task), -1, dtype=np.int64)
        for col in np.unique(c[live]):
            sel = live & (c == col)
            row_score[sel] = score[col][inv[col][sel]]
        picked = row_score >= bar[task]
        coarse = np.where(self.coarser[best] & (top > 0), top, -1)
        sub = np.where(coarse.max(1) > 0, coarse.argmax(1), -1)
        for col in np.unique(sub[sub >= 0]):
            sel = live & (sub[task] == col)
            hold = np.bincount(inv[col][sel], weights=picked[sel], minlength=len(score[col])) > 0
            picked[sel] = hold[inv[col][sel]]
            c[sel] = col
        return c, picked

    def _scores(self, rows, task, free, open_):
        """Per group and field, the best value's GGR score; per field, row → pair ids, pair scores."""
        n_tasks, m = free.shape
        top = np.full((n_tasks, m), -1, dtype=np.int64)
        inv: dict[int, np.ndarray] = {}
        score: dict[int, np.ndarray] = {}
        usable = free & open_[:, None]
        live = open_[task]
        rows, task = rows[live], task[live]
        for col in np.flatnonzero(usable.any(0)):
            k = len(self.t.weight[col])
            pairs, back, counts = np.unique(task * k + self.t.codes[rows, col], return_inverse=True, return_counts=True)
            inv[col] = np.zeros(len(live), dtype=np.int64)
            inv[col][live] = back.ravel()
            pair_task = pairs // k
            score[col] = (counts - 1) * self.t.weight[col][pairs % k]
            starts = np.flatnonzero(np.r_[True, pair_task[1:] != pair_task[:-1]])
            top[pair_task[starts], col] = np.maximum.reduceat(score[col], starts)
        top[~usable] = -1
        return top, inv, score

    def _tail(self, rows: np.ndarray, task: np.ndarray, free: np.ndarray) -> None:
        """Closed groups: fields whose sorted neighbours share most first, rows sorted as text."""
        ids, local = np.unique(task, return_inverse=True)
        local = local.ravel()
        fr = free[ids]
        affinity = np.zeros(fr.shape, dtype=np.float64)
        for col in np.flatnonzero(fr.any(0)):
            o = np.lexsort((self.t.ranks[rows, col], local))
            heads = self.t.head[col][self.t.codes[rows[o], col]]
            same = (local[o][1:] == local[o][:-1])[:, None] & (heads[1:] == heads[:-1])
            # NOTE: neighbours in one group share the first field's name too, whatever its values
            shared = np.cumprod(same, axis=1).sum(1) + self.t.name[col]
            shared[local[o][1:] != local[o][:-1]] = 0
            affinity[:, col] = np.bincount(local[o][1:], weights=shared, minlength=len(ids))
        affinity = np.where(fr, affinity + self.priority, -np.inf)
        cols = np.argsort(-affinity, axis=1, kind="stable")  # (groups, fields): free ones first
        n_free = fr.sum(1)
        keys = [self.t.ranks[rows, cols[local, j]] for j in range(fr.shape[1])]
        o = np.lexsort([*keys[::-1], local])
        starts = np.searchsorted(local[o], np.arange(len(ids)))
        self.keys[-1][rows[o]] = np.arange(len(o)) - starts[local[o]]
        for j in range(fr.shape[1]):
            sel = j < n_free[local]
            self.order[rows[sel], self.depth[rows[sel]] + j] = cols[local[sel], j]

    def _exact(self, rows, task, free, skip) -> np.ndarray:
        """Solve the small open groups exactly; returns which groups it closed."""
        closed = np.zeros(len(free), dtype=bool)
        o = np.argsort(task, kind="stable")
        bounds = np.searchsorted(task[o], np.arange(len(free) + 1))
        for g in np.flatnonzero(~skip):
            members = rows[o[bounds[g] : bounds[g + 1]]]
            idx = np.flatnonzero(free[g])
            _, segments = solve_exact(self.t.codes[members][:, idx], self.t.length[members][:, idx],
                                      list(range(len(members))), tuple(range(len(idx))))
            at = 0
            for local_rows, seg_order in segments:
                r = members[local_rows]
                self.keys[-1][r] = np.arange(at, at + len(r))
                at += len(r)
                self.order[r[:, None], self.depth[r][:, None] + np.arange(len(idx))] = idx[list(seg_order)]
            closed[g] = True
        return closed


def _with_uniform_order(t: _GroupedTable, perm: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The greedy's result, or its most common field order for every row with rows sorted as
    text, whichever shares more between neighbours (a uniform order also shares field names).
    """
    distinct, _, counts = _distinct_rows(orders)
    common = distinct[counts.argmax()]
    uniform = np.lexsort(t.ranks[:, common[::-1]].T)
    uniform_orders = np.broadcast_to(common, orders.shape)
    if _estimate(t, uniform, uniform_orders) > _estimate(t, perm, orders):
        return uniform, uniform_orders
    return perm, orders


def _estimate(t: _GroupedTable, perm: np.ndarray, orders: np.ndarray) -> int:
    """Characters each row shares with the previous one (whole fields, then ≤ 16 more)."""
    codes = np.take_along_axis(t.codes[perm], orders, 1)
    length = np.take_along_axis(t.length[perm], orders, 1)
    same_field = orders[1:] == orders[:-1]
    whole = np.cumprod(same_field & (codes[1:] == codes[:-1]), axis=1)
    k = whole.sum(1)  # fields shared whole
    hits = int((whole * length[1:]).sum())
    at = np.flatnonzero(k < orders.shape[1])
    at = at[same_field[at, k[at]]]
    for g in np.unique(orders[1:][at, k[at]]):
        sel = at[orders[1:][at, k[at]] == g]
        a, b = t.head[g][codes[sel, k[sel]]], t.head[g][codes[sel + 1, k[sel]]]
        hits += int(np.cumprod(a == b, axis=1).sum()) + len(sel) * int(t.name[g])
    return hits


def _distinct_rows(orders: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct field orders, each row's index among them, and their counts."""
    packed = np.ascontiguousarray(orders.astype(np.uint16)).view(f"V{2 * orders.shape[1]}").ravel()
    _, first, which, counts = np.unique(packed, return_index=True, return_inverse=True, return_counts=True)
    return orders[first], which.ravel(), counts


def _priority(t: _GroupedTable) -> np.ndarray:
    """Per field, in [0, 1): how much its repeated values share over the whole table (tie-break)."""
    total = np.array([float(((np.bincount(t.codes[:, j]) - 1).clip(0) * t.weight[j][: t.codes[:, j].max() + 1]).sum())
                      for j in range(t.codes.shape[1])])
    return 0.5 * total / (total.max() + 1)
