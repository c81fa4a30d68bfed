"""`recsys retrain` end to end on the real MLflow of the test stack and a temporary BentoML store:
with no champion the challenger is promoted (the pointer, the MLflow aliases, the comparison logged
to the run, the factors published to the feature tables); an unpromoted challenger is never served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bentos.factory import served_models
from models.champion import CHAMPION_ALIAS, CHALLENGER_ALIAS, ModelSet, read_champion, write_champion
from models.names import ALS_MODEL_NAME, BENTO_INDEX_MODEL, INDEX_MODEL_NAME
from recsys.config import Settings
from tests.support.retrain import END, small_dataset
from tests.support.settings import REPO


@pytest.fixture(scope="module")
def retrained(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, str]:
    """`recsys retrain --no-ranker` (the CLI, its own process) on a small dataset, empty store."""
    tmp = tmp_path_factory.mktemp("retrain")
    settings = small_dataset(stack_settings.with_overrides(data_dir=tmp / "data", dataset="retrain",
                                                           gate_window_days=3))
    home = tmp / "bentoml"
    env = {"RECSYS_DATA_DIR": str(settings.data_path), "RECSYS_RUN_DIR": str(tmp / "run"), "RECSYS_DATASET": settings.dataset,
           "RECSYS_GATE_WINDOW_DAYS": "3", "MLFLOW_TRACKING_URI": settings.effective_mlflow_uri,
           "RECSYS_SPARK_CONF": json.dumps({"spark.sql.shuffle.partitions": "2"})}
    done = subprocess.run([str(Path(sys.executable).with_name("recsys")), "--as-of", END.isoformat(), "retrain",
                           "--no-ranker", "--no-materialize", "--bentoml-home", str(home)],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return settings, home, done.stdout


def test_the_first_challenger_is_promoted_and_says_why(retrained: tuple[Settings, Path, str]) -> None:
    settings, home, out = retrained
    assert "promoted: no champion yet" in out, out
    champion = read_champion(home)
    assert champion is not None and set(champion.tags) == {BENTO_INDEX_MODEL}  # --no-ranker, none to carry
    assert served_models(home).versions["index"] == champion.tags[BENTO_INDEX_MODEL]
    client = MlflowClient(settings.effective_mlflow_uri)
    for name in (ALS_MODEL_NAME, INDEX_MODEL_NAME):
        for alias in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
            assert client.get_model_version_by_alias(name, alias).version == champion.registered[name]
    run = client.get_run(champion.mlflow_run)
    assert run.data.tags["gate_decision"] == "promoted"
    assert "gate/challenger/ndcg_at_10" in run.data.metrics
    assert [a.path for a in client.list_artifacts(champion.mlflow_run, "gate")] == \
        [f"gate/gate-{champion.mlflow_run}.json"]
    comparison_line = next(line for line in out.splitlines() if line.startswith("comparison: "))
    comparison = json.loads(Path(comparison_line.removeprefix("comparison: ")).read_text())
    assert comparison["decision"]["promote"] is True and comparison["champion"] is None
    assert comparison["window"]["scored_users"] == comparison["challenger"]["users"] > 0
    # the promoted factors are the embedding feature tables now
    assert (settings.data_path / "features" / "retrain" / "user_embedding").is_dir()


def test_an_unpromoted_model_is_never_served(retrained: tuple[Settings, Path, str], tmp_path: Path) -> None:
    """A model saved after the champion (what a refused challenger leaves) is the store's latest,
    but the service and precompute serve the champion's."""
    from models.tracking import save_to_bentoml

    settings, home, _ = retrained
    champion = read_champion(home)
    assert champion is not None
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "marker").write_text("not promoted")
    newer = save_to_bentoml(BENTO_INDEX_MODEL, folder, "unpromoted-run", bentoml_home=home)
    assert served_models(home).versions["index"] == champion.tags[BENTO_INDEX_MODEL] != newer
    write_champion(ModelSet({BENTO_INDEX_MODEL: f"{BENTO_INDEX_MODEL}:missing"}), home)
    try:  # a champion missing from the store is absent, not replaced by the latest
        assert served_models(home).versions["index"] == "absent"
    finally:
        write_champion(champion, home)
