"""Training jobs against the real MLflow server of the test stack and a temporary BentoML store:
factors in the feature-table schema, runs with params, metrics, fingerprint and artifacts,
registered models that load and predict, the index in BentoML labelled with the run id."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from models.als import embedding_table_path, load_factors
from models.retrieval import RetrievalIndex, index_path
from models.names import ALS_MODEL_NAME, INDEX_MODEL_NAME, RUN_ID_LABEL
from models.tracking import get_bentoml_model
from pipelines.canonical import reference_time
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from tests.support.models import TinyModels, train_tiny_models


@pytest.fixture(scope="module")
def trained(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, TinyModels, Path]:
    tmp = tmp_path_factory.mktemp("training")
    settings = stack_settings.with_overrides(data_dir=tmp / "data", dataset="tiny")
    bentoml_home = tmp / "bentoml"
    return settings, train_tiny_models(settings, bentoml_home=bentoml_home), bentoml_home


def test_embedding_tables_follow_the_feature_table_contract(trained: tuple[Settings, TinyModels, Path]) -> None:
    settings, models, _ = trained
    cutoff = reference_time(settings.dataset_path)
    assert models.als.cutoff == cutoff
    for kind, table in (("user", T.USER_EMBEDDING), ("item", T.ITEM_EMBEDDING)):
        path = embedding_table_path(settings, kind)  # type: ignore[arg-type]
        assert path == settings.data_path / "features" / "tiny" / f"{kind}_embedding"
        stored = pq.read_table(path)
        assert stored.schema.equals(T.table_schema(table), check_metadata=False)
        assert set(pc_unique(stored.column(S.COL_TS))) == {cutoff}
    reloaded = load_factors(embedding_table_path(settings, "user"), embedding_table_path(settings, "item"))
    assert np.array_equal(reloaded.items, models.als.factors.items) and reloaded.rank == 8


def pc_unique(column: object) -> list[object]:
    return list({v.as_py() for v in column})  # type: ignore[attr-defined]


def test_runs_are_logged_with_fingerprint_and_artifacts(trained: tuple[Settings, TinyModels, Path]) -> None:
    settings, models, _ = trained
    client = MlflowClient(settings.effective_mlflow_uri)
    run = client.get_run(models.als.run_id)
    assert run.data.params["als_rank"] == "8" and run.data.params["training_cutoff"] == models.als.cutoff.isoformat()
    assert len(run.data.tags["dataset_fingerprint"]) == 16
    assert run.data.params["dataset_fingerprint"] == run.data.tags["dataset_fingerprint"]
    assert run.data.metrics["users"] == len(models.als.factors.user_ids)
    assert "cleaning/invalid/rows_removed" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"user_embedding", "item_embedding", "report"}
    index_run = client.get_run(models.index.run_id)
    assert index_run.data.metrics["user_to_item/recall_at_k"] == 1.0  # exact search at this size
    assert index_run.data.tags["dataset_fingerprint"] == run.data.tags["dataset_fingerprint"]
    assert [a.path for a in client.list_artifacts(index_run.info.run_id, "index")]


def test_registered_models_load_and_predict(trained: tuple[Settings, TinyModels, Path]) -> None:
    settings, models, _ = trained
    mlflow.set_tracking_uri(settings.effective_mlflow_uri)
    als = mlflow.pyfunc.load_model(f"models:/{ALS_MODEL_NAME}/{models.als.registered[ALS_MODEL_NAME]}")
    factors = models.als.factors
    user = int(factors.user_ids[0])
    out = als.predict(pd.DataFrame({S.COL_USER: [user, -5]}), params={"k": 3})
    expected = factors.item_ids[np.argsort(-(factors.items @ factors.users[0]), kind="stable")[:3]]
    assert out.loc[0, "item_ids"] == expected.tolist()
    assert out.loc[1, "item_ids"] == []  # an unknown user gets nothing, not an error
    similar = mlflow.pyfunc.load_model(f"models:/{INDEX_MODEL_NAME}/{models.index.registered[INDEX_MODEL_NAME]}")
    item = int(factors.item_ids[0])
    got = similar.predict(pd.DataFrame({S.COL_ITEM: [item]}), params={"k": 5})
    assert len(got.loc[0, "item_ids"]) == 5 and item not in got.loc[0, "item_ids"]


def test_index_in_bentoml_store_matches_the_saved_one(trained: tuple[Settings, TinyModels, Path]) -> None:
    settings, models, bentoml_home = trained
    bento = get_bentoml_model(models.index.bento_tag, bentoml_home=bentoml_home)
    assert bento.info.labels[RUN_ID_LABEL] == models.index.run_id
    from_store = RetrievalIndex.load(Path(bento.path))
    from_disk = RetrievalIndex.load(index_path(settings))
    queries = models.als.factors.users[:10]
    assert np.array_equal(from_store.user_to_item.search(queries, 10)[1], from_disk.user_to_item.search(queries, 10)[1])
    assert np.array_equal(from_store.user_to_item.search(queries, 10)[0], from_disk.user_to_item.search(queries, 10)[0])
