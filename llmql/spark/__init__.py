"""llmql on Apache Spark: SQL functions, optimised distributed queries, DataFrame functions.

    import llmql.spark
    llmql.spark.register(spark)                       # llm(), llm_filter(), ... in spark.sql
    df = llmql.spark.sql(spark, "SELECT * FROM movies WHERE llm_filter('Kids?', movie_info)")
    from llmql.spark import functions as L            # column functions, transform helpers
"""

from __future__ import annotations

from llmql.connectors.spark.plan import SparkQueryResult, run, run_plan, sql
from llmql.connectors.spark.session import local_session
from llmql.connectors.spark.udf import register
from llmql.connectors.spark.worker import use_engine

__all__ = [
    "SparkQueryResult",
    "local_session",
    "register",
    "run",
    "run_plan",
    "sql",
    "use_engine",
]
