"""Dictionary-encoded view of a table for reordering: codes, rendered lengths, sort ranks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PREFIX_CHARS = 16  # characters kept per value for the tail's prefix-affinity estimate


@dataclass(frozen=True)
class EncodedTable:
    """One integer code per cell; per-code statistics for each field.

    `codes[j][i]` is row i's value code in field j; `length[j][k]` is the rendered length of
    code k (`field: value` plus a newline); `rank[j][k]` orders codes like their text.
    """

    fields: tuple[str, ...]
    codes: tuple[np.ndarray, ...]
    length: tuple[np.ndarray, ...]
    rank: tuple[np.ndarray, ...]
    head: tuple[np.ndarray, ...]  # (k, PREFIX_CHARS) uint32 code points of each value's start

    @property
    def num_rows(self) -> int:
        return len(self.codes[0]) if self.codes else 0


def to_arrow(table) -> pa.Table:
    """A pyarrow Table from a pyarrow Table or a pandas DataFrame."""
    if isinstance(table, pa.Table):
        return table
    return pa.Table.from_pandas(table, preserve_index=False)


def encode(table: pa.Table, fields: list[str]) -> EncodedTable:
    """Dictionary-encode `fields` of `table` (values as text; NULL as its own code)."""
    cols = [_encode_column(table.column(f), f) for f in fields]
    return EncodedTable(tuple(fields), *(tuple(c[i] for c in cols) for i in range(4)))


def _encode_column(column: pa.ChunkedArray, name: str):
    text = pc.cast(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0), pa.string())
    encoded = pc.dictionary_encode(text)
    dictionary = encoded.dictionary
    k = len(dictionary)
    codes = encoded.indices.fill_null(k).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pa.concat_arrays([dictionary, pa.array(["null"], pa.string())])
    length = pc.utf8_length(values).to_numpy().astype(np.int64) + len(name) + 3
    rank = np.empty(k + 1, dtype=np.int64)
    rank[pc.array_sort_indices(values).to_numpy()] = np.arange(k + 1)
    heads = pc.utf8_slice_codeunits(values, 0, PREFIX_CHARS).to_numpy(zero_copy_only=False)
    head = np.array(heads.astype(f"U{PREFIX_CHARS}")).view(np.uint32).reshape(k + 1, PREFIX_CHARS)
    return codes, length, rank, head
