"""Errors raised while planning a query: all are `PlanError`, a `ValueError`."""

from __future__ import annotations


class PlanError(ValueError):
    """A query that cannot be planned; raised before any model call."""


class SQLParseError(PlanError):
    """SQL that does not parse; the message names the line and column."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None):
        super().__init__(message)
        self.line = line
        self.col = col


class UnsupportedError(PlanError):
    """An LLM call in a construct the planner cannot rewrite faithfully (named in the message)."""


class UnknownColumnError(PlanError):
    """A column that the given schema or connection does not have."""
