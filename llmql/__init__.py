"""llmql: call LLMs from SQL and DataFrames, optimised end to end for prefix reuse."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "connect", "register"]

if TYPE_CHECKING:
    import duckdb

    from llmql.connectors.duckdb import LLMConnection


def connect(database: str | None = None, **kwargs: Any) -> LLMConnection:
    """Open a DuckDB connection with llmql's LLM functions (see `llmql.connectors.duckdb`)."""
    from llmql.connectors.duckdb import connect as _connect

    return _connect(database, **kwargs)


def register(con: duckdb.DuckDBPyConnection, **kwargs: Any) -> Any:
    """Register llmql's LLM functions on an existing DuckDB connection."""
    from llmql.connectors.duckdb import register as _register

    return _register(con, **kwargs)


def load_ipython_extension(ipython: object) -> None:
    """`%load_ext llmql`: the `%llmql` / `%%llmql` magics (see `llmql.connectors.notebook`)."""
    from llmql.connectors.notebook import load_ipython_extension as _load

    _load(ipython)
