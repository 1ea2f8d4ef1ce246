"""Connectors: run a plan's relational stages on a SQL engine and expose the LLM functions.

- `llmql.connectors.duckdb`: `connect()` (plan-driven queries) and `register()` (UDFs).
- `llmql.connectors.arrow`: the functions over Arrow tables (table in, table out).
- `llmql.connectors.pandas`: the `df.llm` accessor, after `register_accessor()`.
- `llmql.connectors.spark`: the same plan on Spark DataFrames (public API: `llmql.spark`).

Nothing is imported or registered as a side effect of importing this package.
"""
