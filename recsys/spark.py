"""One way to get a SparkSession, configured from Settings (local mode here, a cluster in prod)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: Defaults that suit local mode on a small machine; every key can be overridden by spark_conf.
LOCAL_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "8",
    "spark.driver.memory": "4g",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
}


def spark_conf(settings: Settings) -> dict[str, str]:
    conf = {"spark.master": settings.effective_spark_master, **LOCAL_DEFAULTS}
    conf.update(settings.spark_conf)
    return conf


def prepare_spark_env(settings: Settings) -> None:
    """Environment every Spark driver in this process needs (ours or the one Feast starts)."""
    # workers must run the same interpreter as the driver (the project's venv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if settings.effective_spark_master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # stay on loopback in local mode


def get_spark(settings: Settings, app_name: str = "recsys") -> SparkSession:
    """The process's SparkSession (created on first call, reused after)."""
    from pyspark.sql import SparkSession

    prepare_spark_env(settings)
    builder = SparkSession.builder.appName(app_name)
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
