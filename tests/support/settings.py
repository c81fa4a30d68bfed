"""Settings whose data, run directory and ports belong to one test only."""

from __future__ import annotations

from pathlib import Path

from pipelines.stack import free_port
from recsys.config import Settings

REPO = Path(__file__).resolve().parents[2]


def isolated_settings(tmp: Path, **overrides: object) -> Settings:
    """Settings whose data, run dir and ports belong to one test session only."""
    values: dict[str, object] = {
        "home": REPO,
        "data_dir": tmp / "data",
        "run_dir": tmp / "run",
        "redis_port": free_port(),
        "kafka_port": free_port(),
        "mlflow_port": free_port(),
        "service_port": free_port(),
    }
    values.update(overrides)
    return Settings(**values)
