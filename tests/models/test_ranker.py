"""The ranker's training side: example sampling, point-in-time training frames on the real Feast
stack, `recsys train ranker` end to end (MLflow, BentoML), and the two-stage model against ALS
alone on ML-100K (opt-in)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.ranker.config import RankerConfig
from models.ranker.examples import COL_LABEL, ExampleConfig, sample_examples, sample_label_users
from models.ranker.features import COL_RETRIEVED
from models.ranker.scorer import load_scorer
from models.retrieval import Candidates
from recsys import schema as S
from recsys.config import Settings
from tests.support.models import tiny_frame, user_and_items

# ---- pure logic -------------------------------------------------------------------------------


def test_example_config_rejects_invalid_values_by_name() -> None:
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


# ---- point-in-time training frames on the real feature store --------------------------------------


def test_training_frame_never_holds_a_value_stamped_after_its_label(feature_ws: Settings) -> None:
    from models.als import Factors
    from models.ranker.examples import feature_frame
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


# The two-stage run on ML-100K takes minutes (its own feature store, Feast point-in-time joins,
# the 5-fold ranker fit). It runs in `make test` again: the hang that once kept it out (the Spark
# driver's heap filling in the Feast join's collect) came from the entity rows reaching Spark as an
# in-memory relation that Feast's query re-reads per view; `get_training_frame` now hands them over
# as a parquet scan, in chunks (docs/training.md, "The training frame in bounded memory").


@pytest.fixture(scope="module")
def ml100k_report(ml100k_path: Path, stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The evaluation with the two-stage and served rows (the served one on the stack's Redis)."""
    from bentos.evaluation import served
    from models.evaluate import run_evaluation
    from models.holdout import EvaluationConfig
    from models.ranker.two_stage import two_stage

    return run_evaluation(ml100k_path, None, config=EvaluationConfig(grid=None), settings=stack_settings,
                          workspace=tmp_path_factory.mktemp("ml100k-eval") / "ws", track=False, progress=False,
                          two_stage=lambda ctx: two_stage(ctx, progress=False),
                          served=lambda ctx: served(ctx, progress=False))


def _headline(report: dict) -> str:
    return ", ".join(f"{k} {report[k]:.4f}" for k in ("two_stage_ndcg@10", "als_ndcg@10", "two_stage_recall@10",
                                                        "als_recall@10"))


@pytest.mark.slow
@pytest.mark.timeout(2700)  # longer than the suite's 900 s: minutes on idle cores, more on shared ones
def test_two_stage_beats_als_alone_on_ml100k(ml100k_report: dict) -> None:
    # the goal: re-ranking ALS's candidates beats ALS alone on the same split, and
    # reaches 0.170 (the measured values: docs/training.md, Ranker)
    print(_headline(ml100k_report))
    assert ml100k_report["two_stage_ndcg@10"] > ml100k_report["als_ndcg@10"], _headline(ml100k_report)
    assert ml100k_report["two_stage_ndcg@10"] >= 0.170, _headline(ml100k_report)


@pytest.mark.slow
@pytest.mark.timeout(2700)  # the same module fixture as above: whichever test runs first pays for it
def test_served_row_on_ml100k(ml100k_report: dict) -> None:
    # the service's engine on the same 904 users: every headline key present and finite (how close
    # it comes to two_stage is a benchmark goal, recorded in benchmarks/results/quality.json)
    from models.evaluate import HEADLINE

    serving = ml100k_report["models"]["served"]["serving"]
    print({k: ml100k_report[f"{k}"] for k in ("served_ndcg@10", "two_stage_ndcg@10")}, serving)
    for key in HEADLINE:
        value = ml100k_report[f"served_{key}"]
        assert value is not None and np.isfinite(value), (key, value)
    assert 0.0 <= ml100k_report["served_ndcg@10"] <= 1.0 and 0.0 <= ml100k_report["served_coverage@10"] <= 1.0
    assert serving["users"] == 904 and serving["ranker"] is True
    # ML-100K has no VIEW/CLICK (nothing trends) and no PURCHASE; every user has >= 16 training
    # ratings, above the cold-start threshold of 10
    assert serving["cold_start"] == 0 and serving["trending_events"] == 0
    assert serving["degraded"] == 0, serving["degraded_reasons"]  # Redis up, the ranker's budget lifted


# ---- `recsys train ranker` end to end: real Spark, Feast, MLflow server, BentoML store ------------


def test_train_ranker_logs_to_mlflow_and_saves_to_bentoml(feature_ws: Settings, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from models.als import ALSConfig
    from models.names import BENTO_RANKER_MODEL, RUN_ID_LABEL
    from models.ranker.job import train_ranker
    from models.tracking import get_bentoml_model

    result = train_ranker(feature_ws, RankerConfig(hidden=(8,), epochs=1, batch_size=64),
                          als=ALSConfig(rank=4, max_iter=3, num_blocks=1), out=tmp_path / "ranker",
                          bentoml_home=tmp_path / "bentoml", progress=False)
    assert result.training.fit.rows > 0 and result.training.fit.positives > 0
    run = MlflowClient(feature_ws.effective_mlflow_uri).get_run(result.run_id)
    assert run.data.params["ranker_epochs"] == "1" and "dataset_fingerprint" in run.data.tags
    assert run.data.metrics["rows"] == result.training.fit.rows
    # the example building's stages, timed one after the other: their sum is at most the whole
    stages = [f"ranker_{stage}_s" for stage in ("split", "clean", "als", "candidates", "frame")]
    assert all(run.data.metrics[name] == result.seconds[name] >= 0 for name in stages)
    assert sum(result.seconds[name] for name in stages) <= result.seconds["ranker_examples_s"] + 0.05  # rounding
    model = get_bentoml_model(result.bento_tag, tmp_path / "bentoml")
    assert result.bento_tag.startswith(f"{BENTO_RANKER_MODEL}:") and model.info.labels[RUN_ID_LABEL] == result.run_id
    scorer = load_scorer(Path(model.path))  # what bentos.factory does with the BentoML model's path
    assert scorer.version == result.run_id
    user, items, ids = user_and_items(1, rank=4)
    assert scorer.score(user, items, ids, np.zeros(len(ids)), {}).shape == (len(ids),)
    # the registered pyfunc scores candidate rows as the exported model does, user by user
    import mlflow

    from models.names import RANKER_MODEL_NAME

    registered = mlflow.pyfunc.load_model(f"models:/{RANKER_MODEL_NAME}/{result.registered[RANKER_MODEL_NAME]}")
    frame, _ = tiny_frame(n_users=2, rank=4)
    scored = registered.predict(frame)
    assert list(scored.columns) == [S.COL_USER, S.COL_ITEM, "score"] and len(scored) == len(frame)
    for user_id in (1, 2):
        user_feats, user_items, user_ids = user_and_items(user_id, rank=4)  # the same rows as `frame`'s
        expected = scorer.score(user_feats, user_items, user_ids, np.zeros(len(user_ids)),
                                {"timestamp": frame[S.COL_TS].iloc[0]})
        np.testing.assert_allclose(scored[frame[S.COL_USER] == user_id]["score"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="item_id"):
        registered.predict(frame.drop(columns=[S.COL_ITEM]))


def test_quantized_row_on_ml100k(ml100k_report: dict) -> None:
    # the two-stage lists re-ranked by the int8 variant the export writes beside the SavedModel:
    # every headline key present and finite, and close to full precision (a variant that scored
    # at random would fall to about popularity's 0.09; how close it is exactly is the benchmark's)
    from models.evaluate import HEADLINE

    for key in HEADLINE:
        value = ml100k_report[f"quantized_{key}"]
        assert value is not None and np.isfinite(value), (key, value)
    assert abs(ml100k_report["quantized_ndcg@10"] - ml100k_report["two_stage_ndcg@10"]) < 0.03
