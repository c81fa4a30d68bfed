"""The two-tower model served as the fifth candidate strategy, on the feature workspace (real
Redis, Feast online store, Spark for the training frames): the served user vector is the one the
training code computes, an engine built from the BentoML store answers with ``two_tower``
candidates and names the model, one without it (or with an export lacking item vectors) still
answers, and seen items are never retrieved. The towers train once (one epoch, small)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bentos.candidates.two_tower import TwoTowerRetriever, load_retriever
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.factory import build_engine
from models.two_tower.config import TwoTowerConfig
from models.two_tower.export import ITEM_IDS_FILE, ITEM_VECTORS_FILE, load_two_tower
from models.two_tower.features import USER_COLUMNS, catalogue_frame
from models.two_tower.job import TwoTowerJobConfig, TwoTowerTrainResult, train_two_tower_job
from recsys import schema as S
from recsys.config import Settings
from tests.support.serving import build_index, personalised_users

SMALL = TwoTowerConfig(user_buckets=256, item_buckets=256, id_dim=8, category_buckets=16, category_dim=4,
                       tag_buckets=64, tag_dim=4, title_vocabulary=100, title_tokens=4, title_dim=4, bucket_dim=4,
                       hidden=(16,), output_dim=16, batch_size=64, epochs=1, select_k=10, recall_ks=(10,),
                       auc_negatives=5, loss="softmax")
JOB = TwoTowerJobConfig(max_rows=5_000, valid_fraction=0.2)
# small quotas, so that on the 40-item catalogue every strategy contributes (as test_engine.py)
QUOTAS = ServingConfig(n_als=5, n_two_tower=5, n_similar=3, n_content=5, n_trending=5, new_item_share=0.0)


@pytest.fixture(scope="module")
def trained(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> TwoTowerTrainResult:
    out = tmp_path_factory.mktemp("two_tower_serving") / "two_tower"
    return train_two_tower_job(feature_ws, SMALL, JOB, out=out, track=False, progress=False)


@pytest.fixture(scope="module")
def index_dir(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index(tmp_path_factory.mktemp("index") / "index")


@pytest.fixture(scope="module")
def retriever(trained: TwoTowerTrainResult) -> TwoTowerRetriever:
    loaded = load_retriever(trained.path)
    assert loaded is not None and loaded.ready
    return loaded


def _online_row(engine: RecommendationEngine, user: int) -> dict:
    features = engine.features.user(user, [])
    assert features is not None
    return dict(features.values)


@pytest.fixture()
def plain_engine(feature_ws: Settings, index_dir: Path) -> Iterator[RecommendationEngine]:
    engine = build_engine(feature_ws, index_dir, config=QUOTAS)
    yield engine
    engine.close()


def test_the_export_carries_every_catalogue_items_vector(trained: TwoTowerTrainResult, feature_ws: Settings) -> None:
    from pipelines.canonical import read_table

    loaded = load_two_tower(trained.path)
    items = catalogue_frame(read_table(feature_ws.dataset_path, "items"))
    assert loaded.catalogue_ids is not None and loaded.catalogue_vectors is not None
    assert loaded.catalogue_ids.tolist() == items[S.COL_ITEM].tolist()
    assert loaded.catalogue_vectors.dtype == np.float32 and loaded.catalogue_vectors.shape == (len(items), 16)
    # the item tower aged at the job's cutoff: what the exported SavedModel computes again
    np.testing.assert_allclose(loaded.catalogue_vectors, loaded.item_vectors(items, as_of=trained.cutoff), atol=1e-6)


def test_the_served_user_vector_is_the_trained_one(trained: TwoTowerTrainResult, retriever: TwoTowerRetriever,
                                                   plain_engine: RecommendationEngine, feature_ws: Settings) -> None:
    user = personalised_users(feature_ws)[0]
    row = _online_row(plain_engine, user)
    assert row.get("n_events") is not None  # a real online row, not an empty one
    served = retriever.user_vector(user, row)
    # the same features, as a frame a training job would hand the towers
    frame = pd.DataFrame([{**{c: row.get(c) for c in USER_COLUMNS}, S.COL_USER: user}])
    np.testing.assert_allclose(served, load_two_tower(trained.path).user_vectors(frame), atol=1e-6)
    np.testing.assert_allclose(served, trained.trained.user_vectors(frame), atol=1e-6)  # the in-memory towers
    # a missing feature is None in the online row: masked, not refused
    sparse = retriever.user_vector(user, {"n_events": row.get("n_events")})
    assert sparse.shape == (1, 16) and np.isfinite(sparse).all()


def test_seen_items_are_never_retrieved(retriever: TwoTowerRetriever, plain_engine: RecommendationEngine,
                                        feature_ws: Settings) -> None:
    user = personalised_users(feature_ws)[0]
    row = _online_row(plain_engine, user)
    first, scores = retriever.retrieve(user, row, set(), 10)
    assert len(first) == 10 and scores == sorted(scores, reverse=True)
    seen = set(first[:5])
    after, _ = retriever.retrieve(user, row, seen, 10)
    assert len(after) == 10 and not seen & set(after)
    assert after[:5] == first[5:]  # the same ranking with the seen ones dropped


def test_an_engine_with_the_two_tower_serves_its_candidates(trained: TwoTowerTrainResult, index_dir: Path,
                                                            feature_ws: Settings, tmp_path: Path) -> None:
    from bentos.arm_engines import build_engines
    from bentos.factory import served_models
    from models.names import BENTO_INDEX_MODEL, BENTO_TWO_TOWER_MODEL
    from models.tracking import save_to_bentoml

    home = tmp_path / "bentoml"
    save_to_bentoml(BENTO_INDEX_MODEL, index_dir, "run-index", bentoml_home=home)
    tag = save_to_bentoml(BENTO_TWO_TOWER_MODEL, trained.path, "run-two-tower", bentoml_home=home)
    models = served_models(home)  # the service's derivation: describe_models on the store
    assert models.two_tower_dir is not None
    assert models.versions["two_tower"] == tag and models.versions["two_tower_mlflow_run"] == "run-two-tower"
    engines = build_engines(feature_ws, models, None, bentoml_home=home, config=QUOTAS)
    engine = engines.default
    try:
        assert engine.candidates.two_tower is not None
        user = personalised_users(feature_ws)[0]
        rec = engine.recommend(user, k=100, use_cache=False)
        strategies = {i["strategy"] for i in rec.items}
        assert not rec.cold_start and not rec.degraded
        assert {"als", "two_tower"} <= strategies
        assert rec.model_versions["two_tower"] == tag
        # seen (recent) items never come back as two-tower candidates
        recent = set(engine.features.user(user, []).recent)  # type: ignore[union-attr]
        assert not recent & {i["item_id"] for i in rec.items if i["strategy"] == "two_tower"}
    finally:
        engines.close()


@pytest.mark.parametrize("variant", ["no_dir", "no_item_vectors", "broken"])
def test_without_the_two_tower_the_engine_still_answers(variant: str, trained: TwoTowerTrainResult, index_dir: Path,
                                                        feature_ws: Settings, tmp_path: Path) -> None:
    folder: Path | None = None
    if variant == "no_item_vectors":  # an export written before the vectors were
        folder = Path(shutil.copytree(trained.path, tmp_path / "old_export"))
        (folder / ITEM_IDS_FILE).unlink()
        (folder / ITEM_VECTORS_FILE).unlink()
    elif variant == "broken":
        folder = tmp_path / "broken"
        folder.mkdir()
    engine = build_engine(feature_ws, index_dir, config=QUOTAS, two_tower_dir=folder)
    try:
        assert engine.candidates.two_tower is None
        rec = engine.recommend(personalised_users(feature_ws)[0], k=100, use_cache=False)
        strategies = {i["strategy"] for i in rec.items}
        assert not rec.cold_start and not rec.degraded and rec.items
        assert "two_tower" not in strategies and "als" in strategies
    finally:
        engine.close()


def test_n_two_tower_is_validated() -> None:
    with pytest.raises(ValueError, match="n_two_tower=-1"):
        ServingConfig(n_two_tower=-1)
