"""The TensorFlow ranker: encoder logic on hand-made values, the SavedModel contract (one user
against N candidates, identical scores after reload), point-in-time training frames on the real
Feast stack, and the two-stage model against ALS alone on ML-100K."""

from __future__ import annotations

import os

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.ranker import (
    COL_RETRIEVED,
    SAVED_MODEL_DIR,
    SERVE_ENDPOINT,
    ITEM_NUMERIC,
    FeatureEncoder,
    RankerConfig,
    PAD_LABEL,
    export_ranker,
    fit_ranker,
    fit_ranker_cv,
    list_features,
    list_ndcg,
    load_scorer,
    tiny_frame,
    to_lists,
    train_tiny_ranker,
)
from models.ranker_train import COL_LABEL, ExampleConfig, sample_examples, sample_label_users
from models.retrieval import Candidates
from recsys import schema as S
from recsys.config import Settings


@pytest.fixture(scope="module")
def tiny_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_ranker(tmp_path_factory.mktemp("ranker") / "ranker")


def _user_and_items(user: int, rank: int = 8) -> tuple[dict, dict, np.ndarray]:
    frame, _ = tiny_frame(rank=rank)
    rows = frame[frame[S.COL_USER] == user]
    first = rows.iloc[0]
    user_feats = {c: first[c] for c in ("n_events", "interaction_count", "top_categories", "user_embedding")}
    return user_feats, {c: rows[c].tolist() for c in rows.columns}, rows[S.COL_ITEM].to_numpy()


# ---- pure logic -------------------------------------------------------------------------------


def test_config_rejects_invalid_values_by_name() -> None:
    with pytest.raises(ValueError, match="hidden=\\(\\)"):
        RankerConfig(hidden=())
    with pytest.raises(ValueError, match="dropout=1.0"):
        RankerConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_hard=0 and n_random=0"):
        ExampleConfig(n_hard=0, n_random=0)
    with pytest.raises(ValueError, match="max_users=0"):
        ExampleConfig(max_users=0)


def test_label_users_are_capped_by_a_seeded_sample() -> None:
    # users 1..5 with positives (user 3 twice): a cap of 2 keeps 2 of them and only their rows
    positives = pd.DataFrame({S.COL_USER: [1, 2, 3, 3, 4, 5], S.COL_ITEM: [10, 20, 30, 31, 40, 50]})
    users, kept = sample_label_users(positives, 2, seed=7)
    assert len(users) == 2 and set(users) <= {1, 2, 3, 4, 5} and list(users) == sorted(users)
    assert set(kept[S.COL_USER]) == set(users) and len(kept) == positives[S.COL_USER].isin(users).sum()
    again, _ = sample_label_users(positives, 2, seed=7)
    np.testing.assert_array_equal(users, again)  # the same seed draws the same users
    # no cap, or a cap above the count: every user and every positive
    for cap in (None, 5, 100):
        every, rows = sample_label_users(positives, cap, seed=7)
        np.testing.assert_array_equal(every, [1, 2, 3, 4, 5])
        assert len(rows) == 6


def test_encoder_imputes_masks_and_buckets_by_hand() -> None:
    # n_events 0 and e-1 -> log1p 0 and 1: mean 0.5, std 0.5 -> standardised -1 and +1
    frame = pd.DataFrame({"n_events": [0.0, np.e - 1], S.COL_TS: ["2026-01-01T06:00Z"] * 2})
    enc = FeatureEncoder.fit(frame, rank=2, category_buckets=5)
    user = enc.user_matrix({"n_events": [0.0, np.e - 1, None], "user_embedding": [[1, 2], None, [1]]},
                           ["2026-01-01T06:00Z", "2026-01-01T06:00Z", None], 3)
    assert user.shape == (3, enc.user_dim)
    np.testing.assert_allclose(user[:, 0], [-1.0, 1.0, 0.0], atol=1e-6)  # missing -> the mean -> 0
    n_numeric = 6
    np.testing.assert_array_equal(user[:, n_numeric], [0.0, 0.0, 1.0])  # its missing-mask
    np.testing.assert_array_equal(user[:, 2 * n_numeric], [1.0, 0.0, 0.0])  # has a vector of rank 2
    # 06:00 -> hour sin 1, cos 0; a missing time gives zeros
    np.testing.assert_allclose(user[0, -4:-2], [1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(user[2, -4:], [0, 0, 0, 0])
    # categories: 1 + id mod 4, missing -> 0
    np.testing.assert_array_equal(enc.categories({S.COL_CATEGORY: [0, 3, 4, None]}, 4), [1, 4, 1, 0])
    items = enc.item_matrix({S.COL_CATEGORY: [2, 5, None]},
                            {"top_categories": [[2, 7], [2], [2]], "preferred_categories": [None, [], [5]]}, 3)
    base = 2 * len(ITEM_NUMERIC)  # values and masks of the numeric features come first
    match_top, match_pref, mask_top, mask_pref = (items[:, base + j] for j in range(4))
    np.testing.assert_array_equal(match_top, [1, 0, 0])
    np.testing.assert_array_equal(mask_top, [0, 0, 1])  # an item without a category cannot match
    np.testing.assert_array_equal(match_pref, [0, 0, 0])
    np.testing.assert_array_equal(mask_pref, [1, 1, 1])  # no list, an empty list, no category


def test_examples_hold_positives_hard_and_random_negatives() -> None:
    t0 = pd.Timestamp("2026-01-02", tz="UTC")
    cands = {1: Candidates(np.array([10, 11, 12, 13]), np.zeros(4, np.float32), ("als",) * 4, np.zeros(4, np.float32))}
    positives = pd.DataFrame({S.COL_USER: [1, 1], S.COL_ITEM: [11, 30]})
    catalogue = np.arange(10, 40)
    out = sample_examples(cands, positives, {1: {20, 21}}, pd.Series({1: t0}), catalogue,
                          ExampleConfig(n_hard=2, n_random=3, missed_positives=True))
    assert out[out[COL_LABEL] == 1][S.COL_ITEM].tolist() == [11, 30]  # every positive, in or out of candidates
    assert out[COL_RETRIEVED].tolist()[:2] == [True, False]
    negatives = out[out[COL_LABEL] == 0][S.COL_ITEM].tolist()
    assert len(negatives) == 5
    assert set(negatives[:2]) <= {10, 12, 13}  # hard: candidates that are not positives
    assert not set(negatives[2:]) & {11, 30, 20, 21, 10, 12, 13}  # random: never seen, positive or hard
    assert (out[S.COL_TS] == t0 - timedelta(microseconds=1)).all()  # just before the first label event
    default = sample_examples(cands, positives, {1: {20, 21}}, pd.Series({1: t0}), catalogue, ExampleConfig())
    assert default[default[COL_LABEL] == 1][S.COL_ITEM].tolist() == [11]  # retrieval missed 30: dropped
    assert set(default[default[COL_LABEL] == 0][S.COL_ITEM]) >= {10, 12, 13}  # every candidate (n_hard 150)


def test_list_features_by_hand() -> None:
    # list 7: reference rows 1, 2 (mean 1.5, std 0.5, best 2), so z = -1, 1, 3 and gaps -1, 0, 1;
    # list 9 has no reference row, so its own rows are the reference: z 0, gap 0
    out = list_features(np.array([1.0, 2.0, 3.0, 10.0]), np.array([7, 7, 7, 9]), np.array([True, True, False, False]))
    np.testing.assert_allclose(out, [[-1, -1], [1, 0], [3, 1], [0, 0]], atol=1e-5)
    assert out.dtype == np.float32 and list_features(np.array([]), np.array([])).shape == (0, 2)


def test_fit_rejects_inputs_without_their_encoder() -> None:
    frame, labels = tiny_frame()
    with pytest.raises(ValueError, match="without the encoder"):
        fit_ranker(frame, labels, 8, inputs={})


def test_list_ndcg_by_hand() -> None:
    # list 1: positive ranked 2nd -> 1/log2(3); list 2: positive first -> 1; list 3: no positive, skipped
    scores = np.array([3.0, 2.0, 1.0, 5.0, 4.0, 1.0, 2.0])
    labels = np.array([0, 1, 0, 1, 0, 0, 0])
    groups = np.array([1, 1, 1, 2, 2, 3, 3])
    assert list_ndcg(scores, labels, groups) == pytest.approx((1 / np.log2(3) + 1.0) / 2)
    # rows: only the chosen rows are ranked (list 1 without its first row: the positive is first)
    rows = np.array([False, True, True, True, True, True, True])
    assert list_ndcg(scores, labels, groups, rows) == pytest.approx(1.0)


def test_recent_similarity_by_hand() -> None:
    from models.als import Factors
    from models.ranker import recent_matrix, recent_similarity

    factors = Factors(np.array([1], np.int64), np.ones((1, 2), np.float32), np.array([1, 2, 3], np.int64),
                      np.array([[2, 0], [0, 3], [1, 1]], np.float32), datetime(2026, 1, 1, tzinfo=timezone.utc))
    recent = recent_matrix([[1, 2], [1, 9], None, [2]])  # 9: no vector; None: no recent items
    np.testing.assert_array_equal(recent[0], [1, 2, -1, -1, -1])
    items = np.array([[1, 0], [1, 1], [1, 0], [0, 0]], np.float32)  # the last item has no vector
    out = recent_similarity(items, recent, factors.item_vectors)
    np.testing.assert_allclose(out[0], [1.0, 0.5], atol=1e-5)  # cosine 1 with item 1, 0 with item 2
    np.testing.assert_allclose(out[1], [np.sqrt(0.5)] * 2, atol=1e-5)  # item 9 is left out
    assert np.isnan(out[2]).all() and np.isnan(out[3]).all()


def test_lists_are_padded_and_lists_without_a_positive_dropped() -> None:
    inputs = {"x": np.arange(5, dtype=np.float32)[:, None]}
    lists, targets = to_lists(inputs, np.array([0, 1, 0, 0, 0], np.float32), np.array([7, 7, 9, 7, 9]))
    assert lists["x"].shape == (1, 3, 1)  # list 9 has no positive: dropped
    np.testing.assert_array_equal(lists["x"][0, :, 0], [0, 1, 3])
    np.testing.assert_array_equal(targets[0], [0, 1, 0])
    _, padded = to_lists(inputs, np.array([0, 1, 1, 0, 0], np.float32), np.array([7, 7, 9, 7, 9]))
    np.testing.assert_array_equal(padded[1], [1, 0, PAD_LABEL])  # list 9: two rows, padded to three


def test_fit_runs_the_callers_keras_callbacks_on_cpu_in_float32() -> None:
    import keras

    class Seen(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[int] = []
            self.policy = ""

        def on_train_begin(self, logs: object = None) -> None:
            self.policy = keras.mixed_precision.dtype_policy().name

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            self.epochs.append(epoch)

    frame, labels = tiny_frame()
    seen = Seen()
    config = RankerConfig(hidden=(8,), epochs=2, users_per_batch=4, cv_folds=2, blends=(0.0,))
    result = fit_ranker_cv(frame, labels, 8, config, progress=False, callbacks=[seen])
    # two folds of two epochs each; no GPU here, so float32 and the CPU batch
    assert seen.epochs == [0, 1, 0, 1] and seen.policy == "float32" and result.device == "CPU"


def test_cross_validated_fit_exports_its_als_blend(tmp_path: Path) -> None:
    frame, labels = tiny_frame()
    config = RankerConfig(hidden=(8,), epochs=2, users_per_batch=4, cv_folds=3, blends=(0.0, 2.0))
    result = fit_ranker_cv(frame, labels, 8, config, progress=False)
    assert result.blend in (0.0, 2.0) and set(result.validation["blend_ndcg@10"]) == {"0.0", "2.0"}
    folder = export_ranker(result, tmp_path / "ranker")
    user, items, ids = _user_and_items(2)
    served = load_scorer(folder).score(user, items, ids, np.zeros(len(ids)), {"timestamp": "2026-01-01T12:00Z"})
    rows = frame[frame[S.COL_USER] == 2]
    inputs = result.encoder.encode_frame(rows)  # one user: its list features are the endpoint's
    expected = np.asarray(result.model(inputs, training=False)).reshape(-1) + result.blend * inputs["als_list"][:, 0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


# ---- the SavedModel -----------------------------------------------------------------------------


def test_signature_scores_one_user_against_n_candidates(tiny_ranker: Path) -> None:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tiny_ranker / SAVED_MODEL_DIR))  # held: its variables live in it
    serve = getattr(loaded, SERVE_ENDPOINT)
    scorer = load_scorer(tiny_ranker)
    enc = scorer.encoder
    for n in (1, 7):
        out = serve(user=tf.zeros([enc.user_dim]), items=tf.zeros([n, enc.item_dim]),
                    item_category=tf.zeros([n], tf.int32), user_embedding=tf.zeros([enc.rank]),
                    item_embedding=tf.zeros([n, enc.rank]))
        assert tuple(out.shape) == (n,)
    spec = {s.name: s.shape.as_list() for s in serve.input_signature}
    assert spec == {"user": [enc.user_dim], "items": [None, enc.item_dim], "item_category": [None],
                    "user_embedding": [enc.rank], "item_embedding": [None, enc.rank]}


def test_saved_model_reload_gives_identical_scores(tmp_path: Path) -> None:
    frame, labels = tiny_frame()
    result = fit_ranker(frame, labels, 8, RankerConfig(hidden=(8,), epochs=1, batch_size=64), progress=False)
    folder = export_ranker(result, tmp_path / "ranker")
    user, items, ids = _user_and_items(2)
    first = load_scorer(folder).score(user, items, ids, np.zeros(len(ids)), {"timestamp": "2026-01-01T12:00Z"})
    again = load_scorer(folder).score(user, items, ids, np.zeros(len(ids)), {"timestamp": "2026-01-01T12:00Z"})
    np.testing.assert_array_equal(first, again)
    # the in-memory Keras model on the same rows: the export changed nothing
    rows = frame[frame[S.COL_USER] == 2]
    keras_logits = np.asarray(result.model(result.encoder.encode_frame(rows), training=False)).reshape(-1)
    np.testing.assert_allclose(first, keras_logits, rtol=1e-5, atol=1e-5)


def test_tiny_ranker_learns_the_hand_made_preference(tiny_ranker: Path) -> None:
    scorer = load_scorer(tiny_ranker)
    assert scorer.version == "tiny"
    for user in (1, 2, 3):
        feats, items, ids = _user_and_items(user)
        logits = scorer.score(feats, items, ids, np.zeros(len(ids)), {})
        liked = ids % 3 == user % 3
        assert logits[liked].min() > logits[~liked].max()  # every liked item above every other
    empty = scorer.score(feats, {}, np.empty(0, np.int64), np.empty(0), {})
    assert empty.shape == (0,)


def test_exported_item_stats_fill_what_the_service_cannot_fetch(tiny_ranker: Path) -> None:
    scorer = load_scorer(tiny_ranker)
    filled = scorer.with_item_stats({"price": [1.0, 2.0, 3.0]}, np.array([2, 999, 1]))
    assert filled["price"] == [1.0, 2.0, 3.0]
    assert filled["item_events"][0] == 2.0 and np.isnan(filled["item_events"][1]) and filled["item_events"][2] == 1.0
    assert filled["item_mean_rating"][0] == 3.5 and filled["item_positive_rate"][2] == 0.5
    # a frame that carries its own statistics (training, evaluation) is left alone
    own = {"item_events": [7.0], "item_mean_rating": [4.0], "item_positive_rate": [0.9]}
    assert scorer.with_item_stats(own, np.array([2])) is own


def test_scorer_handles_missing_features(tiny_ranker: Path) -> None:
    scorer = load_scorer(tiny_ranker)
    items = {"category_id": [None, 1], "price": [None, None], "item_embedding": [None, [0.0] * 3]}
    logits = scorer.score({"n_events": None}, items, np.array([5, 6]), np.zeros(2), {})
    assert logits.shape == (2,) and np.isfinite(logits).all()


# ---- point-in-time training frames on the real feature store --------------------------------------


def test_training_frame_never_holds_a_value_stamped_after_its_label(feature_ws: Settings) -> None:
    from models.als import Factors
    from models.ranker_train import feature_frame
    from recsys import feature_tables as T
    from tests.support.feature_workspace import END, HAND_USER, T1, T2

    factors = Factors(np.array([HAND_USER], np.int64), np.ones((1, 4), np.float32), np.array([1, 2], np.int64),
                      np.ones((2, 4), np.float32), END)
    times = [T1 - timedelta(hours=1), T1, T2 - timedelta(microseconds=1), T2 + timedelta(hours=1)]
    entity = pd.DataFrame({S.COL_USER: [HAND_USER] * 4 + [1, 2], S.COL_ITEM: [1, 2, 1, 2, 1, 2],
                           S.COL_TS: times + [END - timedelta(days=1), END]})
    frame = feature_frame(entity, feature_ws, factors)
    assert frame[S.COL_TS].tolist() == pd.to_datetime(entity[S.COL_TS], utc=True).tolist()  # entity order kept
    # user 1001's profile: 10 events from T1, 20 from T2; nothing before T1
    hand = frame[frame[S.COL_USER] == HAND_USER]["n_events"].tolist()
    assert pd.isna(hand[0]) and hand[1:] == [10, 10, 20]
    # every joined profile value exists offline with a time at or before its row's label time
    offline = pd.read_parquet(T.table_path(feature_ws, T.USER_PROFILE), columns=[S.COL_USER, S.COL_TS, "n_events"])
    offline[S.COL_TS] = pd.to_datetime(offline[S.COL_TS], utc=True)
    for _, row in frame.dropna(subset=["n_events"]).iterrows():
        match = offline[(offline[S.COL_USER] == row[S.COL_USER]) & (offline["n_events"] == row["n_events"])]
        assert (match[S.COL_TS] <= row[S.COL_TS]).any(), row.to_dict()
    items = pd.read_parquet(T.table_path(feature_ws, T.ITEM_PROFILE), columns=[S.COL_ITEM, S.COL_TS])
    items[S.COL_TS] = pd.to_datetime(items[S.COL_TS], utc=True)
    for _, row in frame.dropna(subset=["popularity_7d"]).iterrows():
        assert (items[items[S.COL_ITEM] == row[S.COL_ITEM]][S.COL_TS] <= row[S.COL_TS]).any()
    # the vectors come from the label-time ALS, not from the production embedding view
    assert frame["user_embedding"].iloc[0] is not None and frame[frame[S.COL_USER] == 1]["user_embedding"].isna().all()


# ---- quality on ML-100K ---------------------------------------------------------------------------


# The two-stage run on ML-100K takes about 4 minutes on 2 idle cores (its own feature store, Feast
# point-in-time joins, the 5-fold ranker fit) when it runs alone (`make test-slow`). It stays out
# of the default suite: once, late in a full run sharing one Spark session, the Feast join's
# Arrow collect hung (the driver waiting on a result no task was producing, its heap grown to the
# 4 GB limit; the cause is not established) and the run never finished.
RUN_TWO_STAGE = os.environ.get("RECSYS_RUN_TWO_STAGE") == "1"


@pytest.fixture(scope="module")
def ml100k_report(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not RUN_TWO_STAGE:
        pytest.skip("two-stage ML-100K evaluation (~4 min): set RECSYS_RUN_TWO_STAGE=1 or run `make test-slow`")
    from models.evaluate import EvaluationConfig, run_evaluation
    from models.ranker_train import two_stage

    return run_evaluation(ml100k_path, None, config=EvaluationConfig(grid=None),
                          workspace=tmp_path_factory.mktemp("ml100k-eval") / "ws", track=False, progress=False,
                          two_stage=lambda ctx: two_stage(ctx, progress=False))


def _headline(report: dict) -> str:
    return ", ".join(f"{k} {report[k]:.4f}" for k in ("two_stage_ndcg@10", "als_ndcg@10", "two_stage_recall@10",
                                                        "als_recall@10"))


@pytest.mark.slow
@pytest.mark.timeout(2700)  # ~4 min on 2 idle cores, longer on shared ones: the suite's 900 s is for the rest
def test_two_stage_beats_als_alone_on_ml100k(ml100k_report: dict) -> None:
    # the goal: re-ranking ALS's candidates beats ALS alone on the same split, and
    # reaches 0.170 (measured 0.19 vs 0.177 with the default ALS config: README, Ranker)
    print(_headline(ml100k_report))
    assert ml100k_report["two_stage_ndcg@10"] > ml100k_report["als_ndcg@10"], _headline(ml100k_report)
    assert ml100k_report["two_stage_ndcg@10"] >= 0.170, _headline(ml100k_report)


# ---- `recsys train ranker` end to end: real Spark, Feast, MLflow server, BentoML store ------------


def test_train_ranker_logs_to_mlflow_and_saves_to_bentoml(feature_ws: Settings, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from models.als import ALSConfig
    from models.ranker import BENTO_RANKER_MODEL
    from models.ranker_train import train_ranker
    from models.tracking import RUN_ID_LABEL, get_bentoml_model

    result = train_ranker(feature_ws, RankerConfig(hidden=(8,), epochs=1, batch_size=64),
                          als=ALSConfig(rank=4, max_iter=3, num_blocks=1), out=tmp_path / "ranker",
                          bentoml_home=tmp_path / "bentoml", progress=False)
    assert result.training.fit.rows > 0 and result.training.fit.positives > 0
    run = MlflowClient(feature_ws.effective_mlflow_uri).get_run(result.run_id)
    assert run.data.params["ranker_epochs"] == "1" and "dataset_fingerprint" in run.data.tags
    assert run.data.metrics["rows"] == result.training.fit.rows
    model = get_bentoml_model(result.bento_tag, tmp_path / "bentoml")
    assert result.bento_tag.startswith(f"{BENTO_RANKER_MODEL}:") and model.info.labels[RUN_ID_LABEL] == result.run_id
    scorer = load_scorer(Path(model.path))  # what bentos.factory does with the BentoML model's path
    assert scorer.version == result.run_id
    user, items, ids = _user_and_items(1, rank=4)
    assert scorer.score(user, items, ids, np.zeros(len(ids)), {}).shape == (len(ids),)
    # the registered pyfunc scores candidate rows as the exported model does, user by user
    import mlflow

    from models.tracking import RANKER_MODEL_NAME

    registered = mlflow.pyfunc.load_model(f"models:/{RANKER_MODEL_NAME}/{result.registered[RANKER_MODEL_NAME]}")
    frame, _ = tiny_frame(n_users=2, rank=4)
    scored = registered.predict(frame)
    assert list(scored.columns) == [S.COL_USER, S.COL_ITEM, "score"] and len(scored) == len(frame)
    for user_id in (1, 2):
        user_feats, user_items, user_ids = _user_and_items(user_id, rank=4)  # the same rows as `frame`'s
        expected = scorer.score(user_feats, user_items, user_ids, np.zeros(len(user_ids)),
                                {"timestamp": frame[S.COL_TS].iloc[0]})
        np.testing.assert_allclose(scored[frame[S.COL_USER] == user_id]["score"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="item_id"):
        registered.predict(frame.drop(columns=[S.COL_ITEM]))
