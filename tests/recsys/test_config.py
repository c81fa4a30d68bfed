"""Typed configuration: precedence, endpoint conventions, and errors that name the value."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.config import Settings, find_home, redis_url_to_feast

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "MLFLOW_TRACKING_URI", "SPARK_MASTER",
                "RECSYS_CONFIG", "RECSYS_HOME", "RECSYS_REDIS_PORT", "RECSYS_AS_OF"):
        monkeypatch.delenv(var, raising=False)


def test_defaults_point_at_the_local_stack() -> None:
    s = Settings(home=REPO)
    assert s.redis_is_local and s.kafka_is_local and s.mlflow_is_local
    assert s.effective_redis_url == "redis://127.0.0.1:16379/0"
    assert s.feast_redis_connection_string == "127.0.0.1:16379,db=0"
    assert s.effective_spark_master == "local[*]"
    assert s.data_path == REPO / "data" and s.dataset_path == REPO / "data" / "canonical" / "synthetic"


def test_env_points_services_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:secret@redis.prod:6380/2")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("SPARK_MASTER", "spark://master:7077")
    s = Settings(home=REPO)
    assert not s.redis_is_local and not s.kafka_is_local
    assert s.feast_redis_connection_string == "redis.prod:6380,db=2,password=secret"
    assert s.effective_kafka_bootstrap == "k1:9092,k2:9092"
    assert s.effective_spark_master == "spark://master:7077"


def test_yaml_file_below_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "recsys.yaml"
    cfg.write_text("redis_port: 7000\nkafka_port: 7001\nspark_conf:\n  spark.executor.memory: 2g\n")
    monkeypatch.setenv("RECSYS_CONFIG", str(cfg))
    monkeypatch.setenv("RECSYS_REDIS_PORT", "7100")
    s = Settings(home=REPO)
    assert (s.redis_port, s.kafka_port) == (7100, 7001)  # env beats the file, the file beats defaults
    assert s.spark_conf == {"spark.executor.memory": "2g"}


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSYS_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match=r"RECSYS_CONFIG=.*nope.yaml.* does not exist"):
        Settings(home=REPO)


def test_bad_values_are_named() -> None:
    with pytest.raises(ValidationError, match="redis_port"):
        Settings(home=REPO, redis_port=70000)
    with pytest.raises(ValidationError, match=r"REDIS_URL='localhost:6379' is not a redis:// or rediss:// URL"):
        Settings(home=REPO, redis_url="localhost:6379")
    with pytest.raises(ValidationError, match="unknown_knob"):
        Settings(home=REPO, unknown_knob=1)


def test_as_of_is_utc() -> None:
    naive = Settings(home=REPO, as_of=datetime(1998, 4, 22, 23, 10, 38))
    assert naive.as_of == datetime(1998, 4, 22, 23, 10, 38, tzinfo=timezone.utc)
    assert Settings(home=REPO, as_of="1998-04-23T01:10:38+02:00").as_of == naive.as_of


def test_home_is_found_from_feature_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO / "feature_repo")
    assert find_home() == REPO  # plain `feast` commands run from feature_repo/ see the same data


def test_feast_connection_string_variants() -> None:
    assert redis_url_to_feast("redis://h:1/0") == "h:1,db=0"
    assert redis_url_to_feast("rediss://h/3") == "h:6379,db=3,ssl=true"
    with pytest.raises(ValueError, match="is not a redis:// URL"):
        redis_url_to_feast("http://h:1")


def test_no_setting_is_declared_twice() -> None:
    # a second annotation of a name in a class body silently replaces the first (Python, pydantic):
    # a new `trending_ttl_s` once turned the stream's 7200 s Redis expiry into a 1.0 float
    import ast
    import inspect

    from recsys import config

    settings = next(node for node in ast.parse(inspect.getsource(config)).body
                    if isinstance(node, ast.ClassDef) and node.name == "Settings")
    names = [node.target.id for node in settings.body
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    assert names and sorted({n for n in names if names.count(n) > 1}) == []
    assert Settings().trending_ttl_s == 7_200  # the stream's expiry of the trending sets
