"""Fixtures of the models tests: one local SparkSession and ML-100K as a canonical dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.config import Settings


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from recsys.spark import get_spark

    tmp = tmp_path_factory.mktemp("spark")
    # two shuffle partitions: the test data is small and the machine has two cores
    settings = Settings(data_dir=tmp / "data", run_dir=tmp / "run",
                        spark_conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"})
    yield get_spark(settings, app_name="recsys-tests")


@pytest.fixture(scope="session")
def ml100k_dataset(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K loaded into a temporary canonical dataset (read in place, never copied to the repo)."""
    from pipelines.loaders import load_movielens

    out = tmp_path_factory.mktemp("ml100k") / "ml-100k"
    load_movielens(ml100k_path, out)
    return out
