"""Shared fixtures: an isolated local stack on free loopback ports, and the MovieLens path.

The stack fixture starts real servers (valkey, Tansu, MLflow) in a temporary run directory, so
the tests never touch the demo's stack or data, and stops them at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.stack import LocalStack
from recsys.config import Settings
from tests.support.settings import REPO, isolated_settings



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a test marked ``slow`` run first (a stable sort: the rest keep their order).
    `make test` hands whole modules to two workers in this order (``--dist loadfile
    --no-loadscope-reorder``); the longest module (the ML-100K evaluation, about a third of a
    worker's time) started last would be the tail of the run, started first it overlaps the rest."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None and item.module}
    items.sort(key=lambda item: 0 if item.module is not None and item.module.__name__ in slow else 1)


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    """MovieLens 100K, read in place (its license forbids copying it into the repo)."""
    path = Path(os.environ.get("RECSYS_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path}: set RECSYS_ML100K")
    return path



@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A running local stack (Redis, Kafka, MLflow) for the whole test session."""
    for var in ("REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "MLFLOW_TRACKING_URI", "SPARK_MASTER"):
        os.environ.pop(var, None)
    settings = isolated_settings(tmp_path_factory.mktemp("stack"))
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()


@pytest.fixture(scope="session")
def feature_ws(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A feature workspace (data, snapshots, embeddings, feast apply, materialize) on the stack."""
    from tests.support.feature_workspace import build_feature_workspace

    return build_feature_workspace(stack_settings, tmp_path_factory.mktemp("fs"))
