"""llmql on Spark: the optimizer's plan run on Spark DataFrames (public API: `llmql.spark`).

- `plan`: runs an `LLMPlan` (sources, one distributed stage per call, the final query).
- `stage`: one LLM call as a Spark stage (distinct inputs, co-partitioning, mapInArrow).
- `udf`: the LLM functions registered as Spark SQL UDFs and column functions.
- `worker`: what runs in Spark's Python workers (settings, the shared engine, one batch).
- `session`: a local SparkSession for tests and notebooks.

Importing this package imports nothing else (pickled worker closures import `worker` only).
"""
