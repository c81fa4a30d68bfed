"""The ranker's model side: encoder logic on hand-made values, list features and the listwise
pieces, the (cross-validated) fit, and the SavedModel contract (one user against N candidates,
identical scores after reload) with its scorer."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.ranker.config import RankerConfig
from models.ranker.export import SAVED_MODEL_DIR, SERVE_ENDPOINT, export_ranker
from models.ranker.features import ITEM_NUMERIC, FeatureEncoder, list_features
from models.ranker.fit import fit_ranker, fit_ranker_cv
from models.ranker.listwise import PAD_LABEL, list_ndcg, to_lists
from models.ranker.scorer import load_scorer
from recsys import schema as S
from tests.support.models import tiny_frame, train_tiny_ranker, user_and_items


@pytest.fixture(scope="module")
def tiny_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_ranker(tmp_path_factory.mktemp("ranker") / "ranker")


# ---- pure logic -------------------------------------------------------------------------------


def test_config_rejects_invalid_values_by_name() -> None:
    with pytest.raises(ValueError, match="hidden=\\(\\)"):
        RankerConfig(hidden=())
    with pytest.raises(ValueError, match="dropout=1.0"):
        RankerConfig(dropout=1.0)


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
    from models.ranker.features import recent_matrix, recent_similarity

    factors = Factors(np.array([1], np.int64), np.ones((1, 2), np.float32), np.array([1, 2, 3], np.int64),
                      np.array([[2, 0], [0, 3], [1, 1]], np.float32), datetime(2026, 1, 1, tzinfo=timezone.utc))
    recent = recent_matrix([[1, 2], [1, 9], None, [2]])  # 9: no vector; None: no recent items
    np.testing.assert_array_equal(recent[0], [1, 2, -1, -1, -1])
    items = np.array([[1, 0], [1, 1], [1, 0], [0, 0]], np.float32)  # the last item has no vector
    out = recent_similarity(items, recent, factors.item_vectors)
    np.testing.assert_allclose(out[0], [1.0, 0.5], atol=1e-5)  # cosine 1 with item 1, 0 with item 2
    np.testing.assert_allclose(out[1], [np.sqrt(0.5)] * 2, atol=1e-5)  # item 9 is left out
    assert np.isnan(out[2]).all() and np.isnan(out[3]).all()
    # one row of recent ids is one list for every item (the service), equal to repeating it
    shared = recent_similarity(items, recent[:1], factors.item_vectors)
    np.testing.assert_array_equal(shared, recent_similarity(items, np.repeat(recent[:1], 4, axis=0),
                                                            factors.item_vectors))
    np.testing.assert_allclose(shared[1], [np.sqrt(0.5)] * 2, atol=1e-5)  # item (1,1): cosine 0.707 with 1 and 2


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
    user, items, ids = user_and_items(2)
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


def test_scorer_calls_the_traced_graph_with_the_endpoints_outputs(tiny_ranker: Path) -> None:
    scorer = load_scorer(tiny_ranker)
    endpoint = getattr(scorer._model, SERVE_ENDPOINT)
    assert scorer._serve is endpoint.concrete_functions[0]  # not the polymorphic endpoint
    user, items, ids = user_and_items(1)
    inputs = scorer.inputs(user, items, len(ids), {"timestamp": "2026-01-01T12:00Z"})
    np.testing.assert_array_equal(np.asarray(scorer._serve(**inputs)), np.asarray(endpoint(**inputs)))


def test_an_export_of_another_layout_fails_every_call_without_hanging(tiny_ranker: Path, tmp_path: Path) -> None:
    # TensorFlow's polymorphic call leaks its lock when the arguments do not bind, and every later
    # call then waits forever: through the traced graph, each call raises, from any thread
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf

    folder = shutil.copytree(tiny_ranker, tmp_path / "ranker")
    shutil.rmtree(folder / SAVED_MODEL_DIR)

    class OtherLayout(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="user"),
                                      tf.TensorSpec([None, None], tf.float32, name="items")])
        def serve(self, user: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
            return tf.reduce_sum(items, axis=1) + tf.reduce_sum(user)

    tf.saved_model.save(OtherLayout(), str(folder / SAVED_MODEL_DIR))
    scorer = load_scorer(folder, "full")
    user, items, ids = user_and_items(1)

    def call() -> str:
        try:
            scorer.score(user, items, ids, np.zeros(len(ids)), {})
        except TypeError as err:
            return type(err).__name__
        return "scored"

    with ThreadPoolExecutor(2) as pool:
        # a generous bound: a hung call would never return, a failing one returns at once
        outcomes = [f.result(timeout=60) for f in [pool.submit(call) for _ in range(6)]]
    assert outcomes == ["TypeError"] * 6


def test_saved_model_reload_gives_identical_scores(tmp_path: Path) -> None:
    frame, labels = tiny_frame()
    result = fit_ranker(frame, labels, 8, RankerConfig(hidden=(8,), epochs=1, batch_size=64), progress=False)
    folder = export_ranker(result, tmp_path / "ranker")
    user, items, ids = user_and_items(2)
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
        feats, items, ids = user_and_items(user)
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
