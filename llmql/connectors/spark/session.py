"""A small local SparkSession for notebooks, tests and benchmarks."""

from __future__ import annotations

import os
import sys
from typing import Any

_LOCAL_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "1g",
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
}


def local_session(master: str = "local[2]", app_name: str = "llmql", **conf: Any) -> Any:
    """Start (or reuse) a local SparkSession whose Python workers run this interpreter.

    Args:
        master: Spark master URL; `local[N,F]` allows F attempts per task.
        app_name: the application name.
        **conf: extra Spark settings; keys use `_` for `.` (`spark_driver_memory="2g"`)
            or are passed as given when they already contain dots.

    Returns:
        A `pyspark.sql.SparkSession`.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**_LOCAL_CONF, **_conf_keys(conf)}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _conf_keys(conf: dict[str, Any]) -> dict[str, str]:
    return {(k if "." in k else k.replace("_", ".")): str(v) for k, v in conf.items()}
