"""The two-tower model: the logQ correction on a batch worked out by hand, the towers' contract
(shapes, unit norms, unseen ids), retrieval on two hand-made clusters with each loss, the ``auto``
choice, the export round trip and the refusals at the boundary. Small towers and few epochs: the
module trains four times and exports once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.two_tower.config import TwoTowerConfig
from models.two_tower.export import SAVED_MODEL_DIRS, export_two_tower, load_two_tower
from models.two_tower.features import ITEM_TENSORS, USER_TENSORS, TwoTowerEncoder
from models.two_tower.losses import bce_loss, in_batch_logits, sampling_log_q
from models.two_tower.training import CHECKPOINT_DIR, TENSORBOARD_DIR, TrainedTwoTower, train_two_tower
from recsys import schema as S

N_USERS, N_ITEMS, PER_USER, N_VALID = 40, 30, 8, 2  # per cluster; each user's last N_VALID rows validate
START = pd.Timestamp("2026-01-01", tz="UTC")
SMALL = TwoTowerConfig(user_buckets=512, item_buckets=512, id_dim=16, category_buckets=16, tag_buckets=64,
                       tag_dim=8, title_vocabulary=100, title_tokens=4, title_dim=8, bucket_dim=4, hidden=(32,),
                       batch_size=64, epochs=8, patience=3, learning_rate=1e-2, select_k=10, recall_ks=(10, 50),
                       auc_negatives=5, loss="softmax")


def cluster_frames(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid): two clusters of 40 users who interact only with their cluster's 30 items
    (cluster 0: category 1, "red shoe" titles, c1 tags; cluster 1: category 2, "blue hat", c2).
    One row per interaction, with the user's features as of the row (their previous items in
    ``last_5_items``) and the item's columns; each user's last two rows are the validation rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(2 * N_USERS):
        cluster = user // N_USERS
        items = rng.choice(N_ITEMS, PER_USER, replace=False) + cluster * N_ITEMS
        for step, item in enumerate(items):
            recent = [int(i) + 100 for i in items[:step][::-1][:5]]
            rows.append({
                S.COL_USER: 10_000 + user, "n_events": step, "n_events_7d": min(step, 3),
                "mean_rating": None if step == 0 else 3.5 + cluster, "days_since_first_seen": float(step),
                "interaction_count": step, "total_purchases": None, "last_5_items": recent + [-1] * (5 - len(recent)),
                "top_categories": [cluster + 1] if step else [], "preferred_categories": [cluster + 1] if step else None,
                S.COL_ITEM: int(item) + 100, S.COL_CATEGORY: cluster + 1,
                "tags": [f"c{cluster + 1}-t{item % 3}", f"c{cluster + 1}-t9"],
                "title": f"{'Red shoe' if cluster == 0 else 'Blue hat'} {item}",
                "price": 10.0 + 40 * cluster + item % 5, S.COL_CREATED_AT: START - pd.Timedelta(days=int(item)),
                S.COL_TS: START + pd.Timedelta(hours=24 * step + user % 24), "valid": step >= PER_USER - N_VALID,
            })
    frame = pd.DataFrame(rows)
    return (frame[~frame.valid].drop(columns="valid").reset_index(drop=True),
            frame[frame.valid].drop(columns="valid").reset_index(drop=True))


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return cluster_frames()


@pytest.fixture(scope="module")
def trained(frames: tuple[pd.DataFrame, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit per loss (the cluster test checks each) and one ``auto`` fit."""
    train, valid = frames
    out: dict[str, Any] = {}
    for loss in ("softmax", "bce", "auto"):
        workdir = tmp_path_factory.mktemp(f"two_tower_{loss}")
        out[loss] = train_two_tower(train, valid, replace(SMALL, loss=loss), workdir)
        out[f"{loss}_workdir"] = workdir
    return out


def latest_user_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(S.COL_TS).drop_duplicates(S.COL_USER, keep="last").reset_index(drop=True)


def catalogue(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop_duplicates(S.COL_ITEM).sort_values(S.COL_ITEM).reset_index(drop=True)


# ---- pure logic -------------------------------------------------------------------------------


def test_logq_correction_by_hand() -> None:
    # users u0 = (1, 0), u1 = (0, 1); items v0 = (1, 0), v1 = (0, 1); temperature 0.5 -> dots / T =
    # [[2, 0], [0, 2]]. Sampling probabilities q = (0.5, 0.25): log q = (-0.6931, -1.3863), which
    # is subtracted from each column: [[2.6931, 1.3863], [0.6931, 3.3863]]
    user = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    item = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    log_q = np.log(np.array([0.5, 0.25], np.float32))
    logits = np.asarray(in_batch_logits(user, item, log_q, 0.5))
    np.testing.assert_allclose(logits, [[2.6931472, 1.3862944], [0.6931472, 3.3862944]], atol=1e-6)
    # rows 0 and 1 hold the same item: each row's other column is that item again, a positive,
    # not a negative: masked; the diagonal (the row's own positive) keeps its logit
    masked = np.asarray(in_batch_logits(user, item, log_q, 0.5, item_ids=np.array([7, 7])))
    np.testing.assert_allclose(np.diag(masked), [2.6931472, 3.3862944], atol=1e-6)
    assert masked[0, 1] < -1e8 and masked[1, 0] < -1e8


def test_sampling_log_q_counts_training_rows() -> None:
    # training items 5, 5, 5, 9: q(5) = 3/4, q(9) = 1/4; an unseen item counts once: q = 1/4
    np.testing.assert_allclose(sampling_log_q(np.array([5, 5, 5, 9]), np.array([9, 5, 42])),
                               np.log([0.25, 0.75, 0.25]), atol=1e-6)


def test_bce_loss_by_hand() -> None:
    # dot(u, pos) = 1, dot(u, neg) = 0, temperature 1: (softplus(-1) + softplus(0)) / 2 terms;
    # a second negative with weight 0 (the row's own item) does not count
    user = np.array([[1.0, 0.0]], np.float32)
    loss = float(bce_loss(user, user, np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32), 1.0,
                          np.array([[True, False]])))
    assert loss == pytest.approx((np.log1p(np.exp(-1.0)) + np.log(2.0)) / 2, abs=1e-6)


def test_config_and_columns_are_refused_by_name(frames: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loss='hinge' must be one of bce, softmax, auto"):
        TwoTowerConfig(loss="hinge")
    train, valid = frames
    with pytest.raises(ValueError, match=r"no column 'tags'.*add it"):
        train_two_tower(train.drop(columns="tags"), valid, SMALL, tmp_path)
    encoder = TwoTowerEncoder.fit(train, SMALL)
    with pytest.raises(ValueError, match=r"no column 'last_5_items'.*add it"):
        encoder.encode_users(train.drop(columns="last_5_items"))


def test_encoder_json_round_trip_gives_identical_inputs(frames: tuple[pd.DataFrame, pd.DataFrame],
                                                        tmp_path: Path) -> None:
    train, valid = frames
    encoder = TwoTowerEncoder.fit(train, SMALL)
    encoder.save(tmp_path)
    rebuilt = TwoTowerEncoder.load(tmp_path)
    assert rebuilt == encoder
    for frame in (train, valid):
        a, b = encoder.encode(frame), rebuilt.encode(frame)
        assert set(a) == set(USER_TENSORS) | set(ITEM_TENSORS)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the hand-checkable parts: padding -1 -> 0; a missing price -> -1; "|"-joined tags hash as a list
    one = valid.iloc[:2].copy()
    one["price"] = [None, 12.5]
    one["tags"] = ["c1-t0|c1-t9", ["c1-t0", "c1-t9"]]
    items = encoder.encode_items(one)
    np.testing.assert_array_equal(items["item_price"], [-1.0, 12.5])
    np.testing.assert_array_equal(items["item_tags"][0], items["item_tags"][1])
    assert (encoder.encode_users(train.iloc[:1])["user_recent_items"] == 0).all()  # step 0: no recent items


# ---- trained models ---------------------------------------------------------------------------


def test_towers_give_unit_vectors_also_for_unseen_ids(trained: dict[str, Any],
                                                      frames: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    model: TrainedTwoTower = trained["softmax"]
    users, items = latest_user_rows(frames[1]), catalogue(frames[0])
    unseen_users = users.iloc[:3].assign(**{S.COL_USER: [999_999, 5, None], "last_5_items": [[123_456], None, []]})
    unseen_items = items.iloc[:3].assign(**{S.COL_ITEM: [777_777, 1, None], "title": ["never seen words", None, ""],
                                            "tags": [["new"], None, "a|b"], "price": [None, 1e6, 0.0],
                                            S.COL_CREATED_AT: [None, START, START]})
    for vectors in (model.user_vectors(users), model.user_vectors(unseen_users),
                    model.item_vectors(items), model.item_vectors(unseen_items, as_of=START)):
        assert vectors.dtype == np.float32 and vectors.shape[1] == 128
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.user_vectors(users).shape == (len(users), 128)


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_each_loss_retrieves_the_users_own_cluster(trained: dict[str, Any], frames: tuple[pd.DataFrame, pd.DataFrame],
                                                   loss: str) -> None:
    model: TrainedTwoTower = trained[loss]
    users, items = latest_user_rows(frames[1]), catalogue(frames[0])
    scores = model.user_vectors(users) @ model.item_vectors(items, as_of=START).T
    top10 = np.argsort(-scores, axis=1)[:, :10]
    user_cluster = (users[S.COL_USER].to_numpy() - 10_000) // N_USERS
    item_cluster = (items[S.COL_ITEM].to_numpy() - 100) // N_ITEMS
    own = item_cluster[top10] == user_cluster[:, None]
    # expected 1.0 for both: the clusters share no item, category, tag or title word; 0.95 leaves
    # room for a stray item in a few users' lists
    assert own.all(axis=1).mean() >= 0.95 and own.mean() >= 0.95, (loss, own.all(axis=1).mean(), own.mean())
    # within a cluster the held-out items are random: the best the towers can do is rank the
    # user's 24 unseen own-cluster items first, so recall@10 ~ 10 / 24 = 0.42 (chance: 10 / 54 =
    # 0.19) and the AUC against negatives drawn from both clusters ~ (1 + 0.5) / 2 = 0.75 (0.5)
    assert model.metrics["recall@10"] > 0.3 and model.metrics["auc"] > 0.65, model.metrics
    assert model.metrics["recall@50"] == 1.0  # the 24 own-cluster items all rank above the others
    assert model.loss == loss and model.trials == {loss: model.metrics}


def test_auto_keeps_the_loss_with_the_higher_validation_recall(trained: dict[str, Any]) -> None:
    auto: TrainedTwoTower = trained["auto"]
    assert set(auto.trials) == {"softmax", "bce"}
    other = ({"softmax", "bce"} - {auto.loss}).pop()
    assert auto.trials[auto.loss]["recall@10"] >= auto.trials[other]["recall@10"]
    assert auto.metrics == auto.trials[auto.loss]
    workdir: Path = trained["auto_workdir"]
    assert {p.name for p in (workdir / TENSORBOARD_DIR).iterdir()} == {"softmax", "bce"}
    assert (workdir / CHECKPOINT_DIR / "softmax.weights.h5").is_file()


def test_export_round_trip_gives_the_same_vectors(trained: dict[str, Any], frames: tuple[pd.DataFrame, pd.DataFrame],
                                                  tmp_path: Path) -> None:
    model: TrainedTwoTower = trained["auto"]
    folder = export_two_tower(model, tmp_path / "two_tower", metadata={"dataset": "clusters"})
    assert all((folder / d / "saved_model.pb").is_file() for d in SAVED_MODEL_DIRS)
    loaded = load_two_tower(folder)
    assert loaded.loss == model.loss and loaded.metadata["dataset"] == "clusters"
    assert loaded.metadata["validation"][model.loss] == pytest.approx(model.metrics)
    assert loaded.encoder == model.encoder
    users, items = pd.concat(frames, ignore_index=True), catalogue(frames[0])
    np.testing.assert_allclose(loaded.user_vectors(users), model.user_vectors(users), atol=1e-6)
    np.testing.assert_allclose(loaded.item_vectors(items), model.item_vectors(items), atol=1e-6)
    np.testing.assert_allclose(loaded.item_vectors(items, as_of=START), model.item_vectors(items, as_of=START),
                               atol=1e-6)
