"""Arrow-batched Spark UDFs over the udfs executor (dedup and reorder per Arrow batch).

SQL form, after `register(spark)`::

    SELECT llm_filter('Is this movie suitable for kids?', movie_info, review_content) FROM t
    SELECT llm_classify('Sentiment?', review_content, labels => array('pos', 'neg')) FROM t
    SELECT llm('Summarise.', info => movie_info, review => review_content) FROM t

Named arguments whose name is a `CallOptions` field (labels, lo, hi, json_schema,
max_tokens, ...) are options; other named arguments are prompt fields under that name.
Positional fields are named after their position (`arg1`, `arg2`, ...), since Spark does not
pass column names to Python UDFs; `llmql.spark.sql` and `llmql.spark.functions` use the
real column names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from llmql.connectors.spark_worker import EngineFactory, WorkerContext, run_batch
from llmql.udfs.functions import validate
from llmql.udfs.types import CallOptions, CallSpec, UDFError

ROW_FUNCTIONS = ("llm", "llm_filter", "llm_classify", "llm_score", "llm_extract")
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(CallOptions))
_SQL_TYPES = {
    "llm": "string",
    "llm_filter": "boolean",
    "llm_classify": "string",
    "llm_score": "bigint",
    "llm_extract": "string",
}


def register(
    spark: Any,
    *,
    engine_factory: EngineFactory | None = None,
    prefix: str = "",
    **settings: object,
) -> list[str]:
    """Register the row LLM functions as Arrow UDFs on `spark` for use in `spark.sql`.

    Args:
        spark: a SparkSession.
        engine_factory: a picklable zero-argument callable returning an Engine for the
            workers; None loads the settings' model in each Python worker (once per worker).
        prefix: prepended to each SQL function name.
        **settings: overrides of `llmql.settings.Settings` shipped to the workers.

    Returns:
        The registered SQL function names. `llm_extract` returns its JSON object as text
        in SQL; use `llmql.spark.functions.llm_extract` for a typed STRUCT column.
    """
    ctx = WorkerContext.capture(engine_factory, workers=_parallelism(spark), **settings)
    names = []
    for function in ROW_FUNCTIONS:
        spark.udf.register(prefix + function, sql_udf(function, ctx))
        names.append(prefix + function)
    return names


def sql_udf(function: str, ctx: WorkerContext) -> Any:
    """An Arrow UDF `f(instruction, *fields, **named)` for SQL; options come as named args."""
    from pyspark.sql.functions import arrow_udf

    def evaluate(instruction: pa.Array, *cols: pa.Array, **named: pa.Array) -> pa.Array:
        fields = {f"arg{i + 1}": col for i, col in enumerate(cols)}
        options: dict[str, Any] = {}
        for name, col in named.items():
            if name in _OPTION_NAMES:
                options[name] = _constant(col, name)
            else:
                fields[name] = col
        spec = CallSpec(function, _constant(instruction, "instruction"), tuple(fields),
                        CallOptions.from_dict(options))
        values = run_batch(ctx, spec, pa.table(fields)).values
        return _as_json_text(values) if function == "llm_extract" else values

    return arrow_udf(evaluate, _SQL_TYPES[function])


def column_udf(spec: CallSpec, ctx: WorkerContext) -> Any:
    """An Arrow UDF over the columns of `spec.fields`, typed by the function (STRUCT for
    llm_extract); the spec is validated here, on the driver, before any model call."""
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.pandas.types import from_arrow_type

    return_type = from_arrow_type(validate(spec).arrow_type(spec.options))
    fields = spec.fields

    def evaluate(*cols: pa.Array) -> pa.Array:
        return run_batch(ctx, spec, pa.table(dict(zip(fields, cols)))).values

    return arrow_udf(evaluate, return_type)


def make_spec(function: str, instruction: str, fields: Sequence[str], options: dict) -> CallSpec:
    """A validated CallSpec (raises UDFError for unknown functions or bad options)."""
    if function not in ROW_FUNCTIONS:
        raise UDFError(f"{function!r} is not a row LLM function; known: {list(ROW_FUNCTIONS)}")
    spec = CallSpec(function, instruction, tuple(fields), CallOptions.from_dict(options))
    validate(spec)
    return spec


def _constant(col: pa.Array, name: str) -> Any:
    items = col.to_pylist()
    value = items[0] if items else None
    if any(item != value for item in items):
        raise UDFError(f"{name} must be a constant, got different values across rows")
    return tuple(value) if isinstance(value, list) else value


def _as_json_text(values: pa.Array) -> pa.Array:
    items = values.to_pylist()
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in items],
                    type=pa.string())


def _parallelism(spark: Any) -> int:
    master = spark.sparkContext.master
    return spark.sparkContext.defaultParallelism if master.startswith("local") else 0
