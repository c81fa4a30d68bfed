"""`recsys retrain` end to end on the real MLflow of the test stack and a temporary BentoML store:
with no champion the challenger is promoted (the pointer, the MLflow aliases, the comparison logged
to the run, the factors published to the feature tables); an unpromoted challenger is never served;
the gate judges the whole set, so a challenger whose ranker ranks worse is refused on the two-stage
lists even though its ALS alone would pass, and the refusal is recorded on the run (real Spark,
Feast, TensorFlow and MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from bentos.factory import served_models
from models.als import ALSConfig
from models.champion import CHAMPION_ALIAS, CHALLENGER_ALIAS, ModelSet, read_champion, write_champion
from models.gate import GateDecision, decide
from models.gate_scoring import champion_set, gate, stored_ranker
from models.names import ALS_MODEL_NAME, BENTO_INDEX_MODEL, BENTO_RANKER_MODEL, INDEX_MODEL_NAME
from pipelines.cleaning import CleaningConfig
from recsys.config import Settings
from tests.support.hung_ranker import als_ranker, reversed_ranker
from tests.support.models import train_tiny_ranker
from tests.support.ranked_retrain import gate_als_fit, store_set, with_feature_store
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


# ---- the gate judges the whole set: the ranker too ---------------------------------------------------

#: the ALS of both sets; its rank is the rankers' embedding size (they are fed the set's own vectors)
ALS = ALSConfig(rank=8, max_iter=5, num_blocks=1)


@dataclass(frozen=True)
class Refused:
    """What the gate with rankers returned (``decision``, ``comparison``) for the stored
    ``champion`` and ``challenger`` sets in the BentoML store at ``home``, on ``settings``."""

    settings: Settings
    decision: GateDecision
    comparison: dict[str, Any]
    champion: ModelSet
    challenger: ModelSet
    home: Path


@pytest.fixture(scope="module")
def refused(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Refused:
    """The gate (:func:`models.gate_scoring.gate`) on a small dataset between two sets that share
    their ALS factors, the very fit the gate makes for the challenger: the champion's ranker
    orders each candidate list as ALS does, the challenger's is that ranker reversed (its scores
    negated: each list's worst candidates first). Both sets are stored as a retrain stores them
    and read back as `recsys retrain` reads them for the gate (the champion's pointer, the
    challenger's ranker tag, scored as it is: no refit)."""
    tmp = tmp_path_factory.mktemp("gate-ranker")
    settings = with_feature_store(stack_settings.with_overrides(data_dir=tmp / "data", dataset="ranked", as_of=END,
                                                                gate_window_days=3))
    home = tmp / "bentoml"
    # a trained export (its signature, encoder and item statistics) wrapped to score by the ALS vectors
    agrees = als_ranker(train_tiny_ranker(tmp / "tiny", rank=ALS.rank), tmp / "agrees")
    factors = gate_als_fit(settings, ALS, CleaningConfig())
    champion = store_set(settings, factors, agrees, home, tmp, "champion")
    write_champion(champion, home)
    challenger = store_set(settings, factors, reversed_ranker(agrees, tmp / "reversed"), home, tmp, "challenger")
    scored, why = champion_set(read_champion(home), settings, home)
    assert scored is not None, why
    decision, comparison = gate(settings, ALS, CleaningConfig(), scored, why,
                                ranker=stored_ranker(challenger.tags[BENTO_RANKER_MODEL], settings, home))
    return Refused(settings, decision, comparison, champion, challenger, home)


def test_a_ranker_that_ranks_worse_is_refused_on_the_two_stage_lists(refused: Refused) -> None:
    decision, comparison = refused.decision, refused.comparison
    rows = comparison["rows"]
    assert not decision.promote, decision.reason
    assert comparison["decided_by"] == {"challenger": "two_stage", "champion": "two_stage"}
    assert decision.reason.startswith("kept the champion: challenger ndcg@10"), decision.reason
    assert decision.reason.endswith("(two-stage lists)"), decision.reason
    # the comparison carries both rows for both sets, scored on the same window users
    scored = comparison["sample"]["users"]
    assert scored == comparison["window"]["scored_users"] > 0  # fewer than gate_max_users: no sample drawn
    assert {rows[row][side]["users"] for row in ("als", "two_stage") for side in ("challenger", "champion")} == {scored}
    assert comparison["challenger"] == rows["two_stage"]["challenger"]
    assert comparison["champion"] == rows["two_stage"]["champion"]
    # the same factors, the same ALS rows: on them alone the challenger would have been promoted
    for metric in ("ndcg@10", "recall@10", "ndcg@20"):
        assert rows["als"]["challenger"][metric] == rows["als"]["champion"][metric], metric
    als_only = decide(rows["als"]["challenger"], rows["als"]["champion"], "ndcg@10", comparison["tolerance"])
    assert als_only.promote, als_only.reason
    # the champion's ranker keeps ALS's order and its candidates hold ALS's top 10: its two-stage
    # lists are its ALS lists (expected: its als row); the challenger's put the worst candidates first
    assert rows["two_stage"]["champion"]["ndcg@10"] == rows["als"]["champion"]["ndcg@10"]
    assert decision.champion is not None
    assert decision.challenger == rows["two_stage"]["challenger"]["ndcg@10"] < decision.champion - decision.tolerance
    assert comparison["rankers"] == {"challenger": refused.challenger.tags[BENTO_RANKER_MODEL],
                                     "champion": refused.champion.tags[BENTO_RANKER_MODEL]}
    # the gate decides, it never promotes: the pointer still names the champion
    assert read_champion(refused.home) == refused.champion


def test_a_refusal_is_recorded_with_every_rows_metrics(refused: Refused) -> None:
    """What `recsys retrain` does with the gate's answer (``models.retrain._record``, on a run of
    the test stack's MLflow): the comparison as an artefact, the tags, every row's metrics."""
    from models.retrain import _record

    client = MlflowClient(refused.settings.effective_mlflow_uri)
    run_id = client.create_run(client.create_experiment(f"gate-record-{uuid.uuid4().hex[:8]}")).info.run_id
    path = _record(refused.settings, run_id, refused.comparison, refused.decision)
    assert json.loads(path.read_text())["decided_by"] == {"challenger": "two_stage", "champion": "two_stage"}
    data = client.get_run(run_id).data
    assert data.tags["gate_decision"] == "kept_champion" and data.tags["gate_reason"] == refused.decision.reason
    rows = refused.comparison["rows"]
    # the deciding rows as gate/<side>/..., every row as gate/<row>/<side>/... ('@' is not allowed: '_at_')
    assert data.metrics["gate/challenger/ndcg_at_10"] == rows["two_stage"]["challenger"]["ndcg@10"]
    for row in ("als", "two_stage"):
        for side in ("challenger", "champion"):
            assert data.metrics[f"gate/{row}/{side}/ndcg_at_10"] == rows[row][side]["ndcg@10"], (row, side)
    assert [a.path for a in client.list_artifacts(run_id, "gate")] == [f"gate/gate-{run_id}.json"]
