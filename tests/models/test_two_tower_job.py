"""`recsys train two-tower` end to end on the feature workspace (real Spark, Feast, MLflow server,
BentoML store): the feature service reads exactly the towers' columns, the rows are the protocol's
positives with point-in-time features, the split is by time, the run, the registered model and
the BentoML model exist and give the trained vectors, and a dataset without positives is refused.
The job runs once (one epoch per loss, small towers)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.two_tower.config import TwoTowerConfig
from models.two_tower.features import ITEM_COLUMNS, USER_COLUMNS
from models.two_tower.job import ONE_US, TwoTowerJobConfig, TwoTowerTrainResult, train_two_tower_job
from recsys import schema as S
from recsys.config import Settings

SMALL = TwoTowerConfig(user_buckets=256, item_buckets=256, id_dim=8, category_buckets=16, category_dim=4,
                       tag_buckets=64, tag_dim=4, title_vocabulary=100, title_tokens=4, title_dim=4, bucket_dim=4,
                       hidden=(16,), output_dim=16, batch_size=64, epochs=1, select_k=10, recall_ks=(10, 50),
                       auc_negatives=5, loss="auto")
JOB = TwoTowerJobConfig(max_rows=100_000, valid_fraction=0.2)


@pytest.fixture(scope="module")
def job(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoTowerTrainResult, Path]:
    tmp = tmp_path_factory.mktemp("two_tower_job")
    result = train_two_tower_job(feature_ws, SMALL, JOB, out=tmp / "two_tower", bentoml_home=tmp / "bentoml",
                                 progress=False)
    return result, tmp


def _events(settings: Settings) -> pd.DataFrame:
    from pipelines.canonical import read_table

    events = read_table(settings.dataset_path, "events")
    events[S.COL_TS] = pd.to_datetime(events[S.COL_TS], utc=True)
    return events


def test_the_feature_service_reads_exactly_the_towers_columns(feature_ws: Settings) -> None:
    from pipelines.feature_store import get_store

    service = get_store(feature_ws).get_feature_service("two_tower_v1")
    names = [f.name for projection in service.feature_view_projections for f in projection.features]
    assert sorted(names) == sorted(set(USER_COLUMNS + ITEM_COLUMNS) - {S.COL_USER, S.COL_ITEM})


def test_the_rows_are_the_protocols_positives_with_point_in_time_features(
        job: tuple[TwoTowerTrainResult, Path], feature_ws: Settings) -> None:
    from models.protocol import MIN_POSITIVE_RATING, POSITIVE_CLICKSTREAM
    from recsys import feature_tables as T

    result, _ = job
    frame = pd.concat([result.train_frame, result.valid_frame], ignore_index=True)
    events = _events(feature_ws)
    positive = (((events[S.COL_EVENT_TYPE] == "RATING") & (events[S.COL_VALUE] >= MIN_POSITIVE_RATING))
                | events[S.COL_EVENT_TYPE].isin(POSITIVE_CLICKSTREAM)) & (events[S.COL_TS] <= result.cutoff)
    expected = events[positive][[S.COL_USER, S.COL_ITEM, S.COL_TS]].drop_duplicates()
    # one row per distinct positive (user, item, time) (the cap does not bind here), each stamped
    # one microsecond before its event
    assert result.positives == len(expected) == len(frame) > 0
    got = frame[[S.COL_USER, S.COL_ITEM]].assign(**{S.COL_TS: frame[S.COL_TS] + ONE_US})
    pd.testing.assert_frame_equal(got.sort_values([S.COL_TS, S.COL_USER, S.COL_ITEM]).reset_index(drop=True),
                                  expected.sort_values([S.COL_TS, S.COL_USER, S.COL_ITEM]).reset_index(drop=True),
                                  check_dtype=False)
    # by hand: a row's n_events is the count of its user's events strictly before the snapshot it
    # joins, the user's latest user_profile snapshot at or before the row's time (within the 2-day TTL)
    snapshots = pd.read_parquet(T.table_path(feature_ws, T.USER_PROFILE), columns=[S.COL_USER, S.COL_TS])
    snapshots[S.COL_TS] = pd.to_datetime(snapshots[S.COL_TS], utc=True)
    checked = 0
    for row in frame.itertuples(index=False):
        mine = snapshots[(snapshots[S.COL_USER] == row.user_id) & (snapshots[S.COL_TS] <= row.event_timestamp)
                         & (snapshots[S.COL_TS] > row.event_timestamp - pd.Timedelta(days=T.USER_PROFILE_TTL_DAYS))]
        if mine.empty:
            assert pd.isna(row.n_events), row  # no snapshot yet: nothing, never a later one
            continue
        snapshot = mine[S.COL_TS].max()
        before = int(((events[S.COL_USER] == row.user_id) & (events[S.COL_TS] < snapshot)).sum())
        assert row.n_events == before, (row, snapshot)
        checked += 1
    assert checked > 0  # the check above is not vacuous


def test_validation_rows_are_all_later_than_the_training_rows(job: tuple[TwoTowerTrainResult, Path]) -> None:
    result, _ = job
    train, valid = result.train_frame, result.valid_frame
    assert len(train) > 0 and len(valid) > 0
    assert train[S.COL_TS].max() < pd.Timestamp(result.split_time) <= valid[S.COL_TS].min()
    assert len(valid) >= JOB.valid_fraction * (len(train) + len(valid))  # the last 20% of label time, ties in


def test_the_job_logs_registers_and_stores_the_towers(job: tuple[TwoTowerTrainResult, Path],
                                                      feature_ws: Settings) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from models.names import BENTO_TWO_TOWER_MODEL, RUN_ID_LABEL, TWO_TOWER_MODEL_NAME
    from models.tracking import get_bentoml_model
    from models.two_tower.export import load_two_tower

    result, tmp = job
    trained = result.trained
    client = MlflowClient(feature_ws.effective_mlflow_uri)
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    assert set(trained.trials) == {"softmax", "bce"} and run.data.params["chosen_loss"] == trained.loss
    for name in ("recall_at_10", "recall_at_50", "auc"):
        for prefix in ("", "softmax/", "bce/"):
            assert f"{prefix}{name}" in metrics, (prefix, name, sorted(metrics))
    assert metrics["recall_at_50"] == pytest.approx(trained.metrics["recall@50"])
    assert metrics["train_rows"] == len(result.train_frame) and run.data.params["feature_service"] == "two_tower_v1"
    version = client.get_model_version(TWO_TOWER_MODEL_NAME, result.registered[TWO_TOWER_MODEL_NAME])
    assert version.run_id == result.run_id
    model = get_bentoml_model(result.bento_tag, tmp / "bentoml")
    assert result.bento_tag.startswith(f"{BENTO_TWO_TOWER_MODEL}:") and model.info.labels[RUN_ID_LABEL] == result.run_id
    loaded = load_two_tower(Path(model.path))  # what a server would do with the BentoML model's path
    assert loaded.metadata["mlflow_run_id"] == result.run_id and loaded.loss == trained.loss
    frame = pd.concat([result.train_frame, result.valid_frame], ignore_index=True)
    np.testing.assert_allclose(loaded.user_vectors(frame), trained.user_vectors(frame), atol=1e-6)
    np.testing.assert_allclose(loaded.item_vectors(frame), trained.item_vectors(frame), atol=1e-6)
    # the registered pyfunc gives the same vectors, and the cosine when a row has both towers' columns
    registered = mlflow.pyfunc.load_model(f"models:/{TWO_TOWER_MODEL_NAME}/{version.version}")
    scored: Any = registered.predict(frame.head(8))
    np.testing.assert_allclose(np.stack(scored["user_vector"]), trained.user_vectors(frame.head(8)), atol=1e-6)
    np.testing.assert_allclose(scored["score"], (trained.user_vectors(frame.head(8))
                                                 * trained.item_vectors(frame.head(8))).sum(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="neither tower's columns"):
        registered.predict(frame[[S.COL_USER, S.COL_ITEM]].head(2))


def test_a_dataset_without_positives_is_refused_naming_the_fix(feature_ws: Settings, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from recsys.cli.main import app

    settings = feature_ws.with_overrides(data_dir=tmp_path / "data", dataset="views_only")
    shutil.copytree(feature_ws.dataset_path, settings.dataset_path)
    events = _events(feature_ws)
    shutil.rmtree(settings.dataset_path / "events")
    (settings.dataset_path / "events").mkdir()
    views = events[events[S.COL_EVENT_TYPE] == "VIEW"]
    pq.write_table(pa.Table.from_pandas(views, schema=S.EVENTS_SCHEMA, preserve_index=False),
                   settings.dataset_path / "events" / "part-00000.parquet", coerce_timestamps="us")
    with pytest.raises(ValueError, match=r"no positive events up to .*use a dataset that has them"):
        train_two_tower_job(settings, SMALL, JOB, out=tmp_path / "two_tower", track=False, progress=False)
    # the command line says the same in one line and exits 2, before any Feast or TensorFlow work
    monkeypatch.setenv("RECSYS_DATA_DIR", str(settings.data_path))
    result = CliRunner().invoke(app, ["--dataset", "views_only", "train", "two-tower", "--no-track", "--epochs", "1"])
    assert result.exit_code == 2 and "error: dataset 'views_only' has no positive events" in result.output, \
        result.output
