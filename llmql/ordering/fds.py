"""Functional dependencies between fields: groups of fields that determine each other."""

from __future__ import annotations

import numpy as np

from llmql.ordering.encoding import EncodedTable


def discover_fds(table: EncodedTable, *, min_rows: int = 2) -> list[list[str]]:
    """Groups of 2+ fields in one-to-one correspondence on this table (each determines the others).

    Vectorised: two fields correspond when their distinct values and distinct value pairs
    number the same. Tables with fewer than `min_rows` rows have no dependencies.

    >>> import pyarrow as pa
    >>> from llmql.ordering.encoding import encode
    >>> t = pa.table({"id": [1, 2, 3, 4], "title": ["a", "b", "a", "b"], "code": [7, 8, 7, 8]})
    >>> discover_fds(encode(t, ["id", "title", "code"]))
    [['title', 'code']]
    """
    n, m = table.num_rows, len(table.fields)
    if n < min_rows:
        return []
    distinct = [len(np.unique(c)) for c in table.codes]
    parent = list(range(m))
    for i in range(m):
        for j in range(i + 1, m):
            if distinct[i] != distinct[j]:
                continue
            pairs = table.codes[i] * (int(table.codes[j].max()) + 1) + table.codes[j]
            if len(np.unique(pairs)) == distinct[i]:
                parent[_root(parent, j)] = _root(parent, i)
    groups: dict[int, list[str]] = {}
    for j, name in enumerate(table.fields):
        groups.setdefault(_root(parent, j), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def determines(codes: np.ndarray) -> np.ndarray:
    """(fields, fields) bool: [c, d] when each value of field c comes with one value of field d.

    >>> determines(np.array([[0, 5], [0, 5], [1, 5], [2, 6]]))
    array([[ True,  True],
           [False,  True]])
    """
    n, m = codes.shape
    out = np.ones((m, m), dtype=bool)
    seen = np.empty(int(codes.max()) + 1 if n else 0, dtype=codes.dtype)
    for c in range(m):
        for d in range(m):
            seen[codes[:, c]] = codes[:, d]  # NOTE: the last row of each value of c wins
            out[c, d] = bool((seen[codes[:, c]] == codes[:, d]).all())
    return out
