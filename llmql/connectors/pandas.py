"""The `df.llm` pandas accessor, registered explicitly (never at import):

    from llmql.connectors.pandas import register_accessor
    register_accessor()
    kids = movies.llm.filter("Is {movie_info} suitable for kids?")
    movies.llm.map("Summarise the review.", "movie_title", "review_content", out="summary")

Every method converts to Arrow, calls `llmql.connectors.arrow`, and returns a new frame.
Options (max_tokens, temperature, model, ...) are keyword arguments; see `CallOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from llmql.connectors import arrow
from llmql.udfs.types import CallReport, UDFError

ACCESSOR = "llm"


def register_accessor(name: str = ACCESSOR) -> None:
    """Register `LLMAccessor` as `DataFrame.<name>` (idempotent)."""
    if isinstance(getattr(pd.DataFrame, name, None), type) or name in getattr(
        pd.DataFrame, "_accessors", set()
    ):
        return
    pd.api.extensions.register_dataframe_accessor(name)(LLMAccessor)


class LLMAccessor:
    """LLM methods on a DataFrame; column checks happen here, once, for every method."""

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    @property
    def report(self) -> CallReport:
        """The report of the most recent LLM call."""
        return arrow.last_report()

    def map(
        self, instruction: str, *columns: str, out: str = "llm", **options: Any
    ) -> pd.DataFrame:
        """A copy with a string column `out`."""
        return self._run(arrow.llm_map, instruction, columns, out=out, **options)

    def filter(self, instruction: str, *columns: str, **options: Any) -> pd.DataFrame:
        """The rows the model says yes to (original index kept)."""
        values = arrow.call(
            self._arrow(instruction, columns), "llm_filter", instruction, columns, **options
        )
        mask = pd.Series(values.to_pylist(), index=self._df.index, dtype="boolean")
        return self._df[mask.fillna(False).astype(bool)]

    def classify(
        self,
        instruction: str,
        labels: Sequence[str],
        *columns: str,
        out: str = "label",
        **options: Any,
    ) -> pd.DataFrame:
        """A copy with a column `out` holding one of `labels`."""
        return self._run(arrow.llm_classify, instruction, columns, labels, out=out, **options)

    def score(
        self, instruction: str, lo: int, hi: int, *columns: str, out: str = "score", **options: Any
    ) -> pd.DataFrame:
        """A copy with an integer column `out` in [lo, hi] (nullable Int64)."""
        return self._run(arrow.llm_score, instruction, columns, lo, hi, out=out, **options)

    def extract(
        self, instruction: str, json_schema: dict | str, *columns: str, **options: Any
    ) -> pd.DataFrame:
        """A copy with one column per schema property."""
        return self._run(arrow.llm_extract, instruction, columns, json_schema, **options)

    def agg(
        self,
        instruction: str,
        column: str,
        *,
        by: Sequence[str] | str = (),
        out: str = "summary",
        **options: Any,
    ) -> pd.DataFrame:
        """One row per group of `by` with a summary column `out`."""
        by = [by] if isinstance(by, str) else list(by)
        table = self._arrow(instruction, (column, *by))
        result = arrow.llm_agg(table, instruction, column, by=by, out=out, **options)
        return result.to_pandas()

    def _arrow(self, instruction: str, columns: Sequence[str]) -> pa.Table:
        """The needed columns as Arrow, after checking they exist."""
        _, fields = arrow.resolve_columns(list(map(str, self._df.columns)), instruction, columns)
        return pa.Table.from_pandas(self._df[list(dict.fromkeys(fields))], preserve_index=False)

    def _run(
        self,
        fn: Any,
        instruction: str,
        columns: Sequence[str],
        *consts: Any,
        out: str | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        table = self._arrow(instruction, columns)
        kwargs = {"out": out} if out is not None else {}
        result = fn(table, instruction, *consts, *columns, **kwargs, **options)
        added = [c for c in result.column_names if c not in table.column_names or c == out]
        frame = self._df.copy()
        for name in added:
            frame[name] = pd.Series(
                result.column(name).to_pylist(),
                index=frame.index,
                dtype=_dtype(result.column(name).type),
            )
        return frame


def _dtype(kind: pa.DataType) -> str | None:
    if pa.types.is_integer(kind):
        return "Int64"
    if pa.types.is_boolean(kind):
        return "boolean"
    return None


__all__ = ["LLMAccessor", "UDFError", "register_accessor"]
