"""`recsys retrain` end to end on the real MLflow of the test stack and a temporary BentoML store:
with no champion the challenger is promoted (the pointer, the MLflow aliases, the comparison logged
to the run, the factors published to the feature tables); an unpromoted challenger is never served;
the gate judges the whole set, so a challenger whose ranker ranks worse is refused on the two-stage
lists even though its ALS alone would pass, and the refusal is recorded on the run; a ranker the
retrain trained itself is scored as a refit on the window's train side (real Spark, Feast,
TensorFlow and MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mlflow.tracking import MlflowClient

from bentos.factory import served_models
from models.als import ALSConfig
from models.champion import CHAMPION_ALIAS, CHALLENGER_ALIAS, ModelSet, read_champion, write_champion
from models.gate import GateDecision, decide
from models.gate_scoring import champion_set, gate, stored_ranker
from models.names import ALS_MODEL_NAME, BENTO_INDEX_MODEL, BENTO_RANKER_MODEL, INDEX_MODEL_NAME
from models.ranker.config import RankerConfig
from models.ranker.examples import ExampleConfig
from models.retrieval import CandidateConfig
from pipelines.cleaning import CleaningConfig
from recsys.config import Settings
from tests.support.feature_workspace import END as WORKSPACE_END
from tests.support.feature_workspace import N_USERS as WORKSPACE_USERS
from tests.support.hung_ranker import als_ranker, reversed_ranker
from tests.support.models import train_tiny_ranker
from tests.support.ranked_retrain import gate_als_fit, store_set, with_feature_store
from tests.support.retrain import END, small_dataset
from tests.support.settings import REPO

if TYPE_CHECKING:
    from models.ranker.precision import Variant


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


# ---- a ranker trained by the retrain is scored as a refit on the window's train side --------------

#: the tiniest ranker configuration that trains on the shared feature workspace: a few label users,
#: short candidate lists, one epoch, one fold (no cross-validation)
TINY_REFIT = {"config": RankerConfig(hidden=(8,), epochs=1, batch_size=64, cv_folds=1),
              "examples": ExampleConfig(candidates=CandidateConfig(n_als=10, n_similar=2), n_hard=10, n_random=3,
                                        max_users=20)}


def test_a_retrained_ranker_is_scored_as_a_refit_in_a_temporary_folder(
        feature_ws: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gate(..., refit=...)``: the challenger's two-stage row scores a refit of the retrained
    ranker's configuration (the ranker itself saw the window's test events as labels), exported to a
    temporary folder removed when the gate returns; with no champion the challenger is promoted.
    The shared workspace is only read (its features, its events up to its last day)."""
    from models import gate_scoring
    from models.ranker.export import META_FILE, SAVED_MODEL_DIR

    refit = gate_scoring.refit_ranker
    exports: list[tuple[Path, dict[str, Any] | None]] = []

    def spy(*args: Any, **kwargs: Any) -> Path:
        # a pass-through: the real refit runs; only its folder (and its metadata, while the folder
        # exists) is recorded, to check that the gate removes it
        folder = refit(*args, **kwargs)
        found = (folder / SAVED_MODEL_DIR / "saved_model.pb").is_file()
        exports.append((folder, json.loads((folder / META_FILE).read_text()) if found else None))
        return folder

    monkeypatch.setattr(gate_scoring, "refit_ranker", spy)
    settings = feature_ws.with_overrides(as_of=WORKSPACE_END)
    # the retrained ranker itself is never read when refit is given: a folder that does not exist
    retrained: tuple[Path | None, Variant, str] = (tmp_path / "never-read", "full",
                                                   "trained by this retrain (ranker:test)")
    decision, comparison = gate(settings, ALS, CleaningConfig(), None, ranker=retrained, refit=TINY_REFIT)

    assert comparison["rankers"] == {
        "challenger": "an evaluation fit of the retrained ranker's configuration on the window's train side "
                      "(trained by this retrain (ranker:test))",
        "champion": None}
    # one refit, exported under the gate's temporary folder, gone once the gate returned
    assert len(exports) == 1, exports
    folder, meta = exports[0]
    assert meta is not None, f"{folder} held no saved model when the refit returned"
    assert meta["purpose"] == "gate evaluation fit (window split's train side)"
    assert meta["config"]["epochs"] == 1 and meta["config"]["cv_folds"] == 1  # TINY_REFIT's, as the retrain's
    assert folder.name == "ranker" and folder.parent.name.startswith("recsys-gate-"), folder
    assert not folder.parent.exists(), folder.parent
    # the two-stage row exists, scored on the same users as the ALS row: every window user with a
    # test positive (all 30 workspace users have events in its 3 days, inside the 7-day window;
    # fewer than gate_max_users 1000: no sample drawn)
    rows = comparison["rows"]
    scored = comparison["window"]["scored_users"]
    assert comparison["window"]["active_users"] == WORKSPACE_USERS  # 30
    assert 0 < scored <= WORKSPACE_USERS and comparison["sample"]["users"] == scored
    assert rows["two_stage"]["challenger"] is not None
    assert rows["two_stage"]["challenger"]["users"] == rows["als"]["challenger"]["users"] == scored
    assert 0.0 <= rows["two_stage"]["challenger"]["ndcg@10"] <= 1.0
    assert rows["als"]["champion"] is None and rows["two_stage"]["champion"] is None
    # what the challenger would serve decides: its two-stage lists; no champion, so it is promoted
    assert comparison["decided_by"] == {"challenger": "two_stage", "champion": None}
    assert comparison["challenger"] == rows["two_stage"]["challenger"] and comparison["champion"] is None
    assert decision.promote and decision.reason == "promoted: no champion yet"
    assert decision.champion is None and decision.challenger == rows["two_stage"]["challenger"]["ndcg@10"]
