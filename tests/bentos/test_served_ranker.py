"""A real `bentoml serve` with a trained ranker in its model store: answers carry the ranker's
version and its scores (the ranker's logits as the rules turn them into answer scores, recomputed
in process with :class:`RankerScorer` on the engine's candidates and features), and a ranker whose
SavedModel fails at call time gives the cosine fallback, flagged, for every request, as does one
that hangs inside TensorFlow past its budget, while other requests keep answering. The server
runs an A/B experiment (ranker, blend and popularity arms): the users compared with the ranker are
in its ranker arm, and the blend and popularity arms answer without the ranker, cached per arm."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from bentos import rules
from bentos.factory import build_engine
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from models.ranker.export import QUANTIZED_FILE, SAVED_MODEL_DIR
from models.ranker.scorer import RankerScorer
from recsys.config import Settings
from recsys.schema import recs_cache_key
from tests.support.feature_workspace import DIM
from tests.support.experiments import experiment_file, served_impression
from tests.support.hung_ranker import FifoGate, hanging_ranker
from tests.support.models import train_tiny_ranker
from tests.support.service_process import Server, serve, service_env
from tests.support.serving import build_index, personalised_users


def _store(home: Path, ranker: Path) -> Path:
    """A BentoML model store with the workspace's index and ``ranker``."""
    from models.tracking import save_to_bentoml

    save_to_bentoml(BENTO_INDEX_MODEL, build_index(home / "build" / "index"), run_id="index-run", bentoml_home=home)
    save_to_bentoml(BENTO_RANKER_MODEL, ranker, run_id="ranker-run", bentoml_home=home)
    return home


@pytest.fixture(scope="module")
def tiny_ranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ranker, its ALS rank the workspace's embedding size: its inputs are what the
    engine passes (the workspace's online features); no int8 variant, so full precision serves."""
    folder = train_tiny_ranker(tmp_path_factory.mktemp("ranker") / "ranker", rank=DIM)
    (folder / QUANTIZED_FILE).unlink(missing_ok=True)
    return folder


ARMS = (("ranker", 0.4, "ranker"), ("blend", 0.3, "blend"), ("popularity", 0.3, "popularity"))


@pytest.fixture(scope="module")
def ranked_server(feature_ws: Settings, tiny_ranker_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = _store(tmp_path_factory.mktemp("bentoml-ranker"), tiny_ranker_dir)
    # an experiment whose salt puts the users the ranker tests use in its ranker arm (the next two in
    # the blend and popularity arms): one server serves both kinds of test
    users = personalised_users(feature_ws)
    exp = tmp_path_factory.mktemp("experiment") / "experiment.json"
    experiment_file(exp, ARMS, {**dict.fromkeys(users[:3], "ranker"), users[3]: "blend", users[4]: "popularity"})
    # a fixed, generous budget: this test is about what the ranker answers, not its latency, and
    # a loaded machine must not turn an answer into a timeout fallback
    env = service_env(feature_ws, home, RECSYS_RANKER_TIMEOUT_MS="5000", RECSYS_RANKER_PRECISION="auto",
                      RECSYS_EXPERIMENT_FILE=str(exp))
    with serve(env, tmp_path_factory.mktemp("serve-ranker") / "serve.log") as srv:
        yield srv


def _fresh(server: Server, settings: Settings, user: int, k: int) -> dict[str, Any]:
    """A cache-miss answer for ``user`` (other tests on this Redis may have cached one)."""
    redis.Redis.from_url(settings.effective_redis_url).delete(recs_cache_key(user))
    status, _, body = server.call("/recommend", {"user_id": user, "k": k})
    assert status == 200, body
    assert body["cached"] is False
    return body


def _expected(engine: Any, scorer: RankerScorer, user_id: int, when: datetime) -> rules.Ruled:
    """The ranker's answer for ``user_id`` built in process: the engine's stages up to scoring,
    then :meth:`RankerScorer.score` itself (not the engine's scoring stage) and the rules."""
    reasons: list[str] = []
    user = engine.features.user(user_id, reasons)
    purchased = engine.features.purchased(user_id, reasons)
    cands = engine.candidates.generate(user, set(user.recent) | purchased, reasons,
                                       engine.candidates.overall_trending(reasons))
    item_feats = engine.features.items(cands.item_ids, reasons)
    assert not reasons, reasons
    ids = np.asarray(cands.item_ids, dtype=np.int64)
    inputs = {**item_feats, **engine.scoring.recent_similarity(user.values, ids)}
    logits = scorer.score(user.values, inputs, ids, np.asarray(cands.scores), {"timestamp": when})
    facts = rules.facts_for(engine.catalog, cands.item_ids, cands.trending, item_feats)
    return rules.apply_rules(rules.to_unit(logits, "logit"), facts, purchased)


def test_answers_carry_the_rankers_version_and_scores(ranked_server: Server, feature_ws: Settings,
                                                      tiny_ranker_dir: Path, tmp_path: Path) -> None:
    engine = build_engine(feature_ws, build_index(tmp_path / "index"), tiny_ranker_dir)
    scorer = RankerScorer(tiny_ranker_dir, "full")
    try:
        for user in personalised_users(feature_ws)[:3]:
            # the served ranker reads the request's hour and weekday (context features) from the
            # clock: the expected answer is computed for the times just before and after it
            before = datetime.now(timezone.utc)
            body = _fresh(ranked_server, feature_ws, user, 10)
            after = datetime.now(timezone.utc)
            assert body["degraded"] is False and body["cold_start"] is False, body
            versions = body["model_versions"]
            assert versions["ranker"].startswith(f"{BENTO_RANKER_MODEL}:") and versions["ranker_mlflow_run"] == "ranker-run"
            assert versions["ranker_variant"] == "full"
            served = [(i["item_id"], i["score"]) for i in body["items"] if i["strategy"] != "new_item"]
            assert len(served) >= 9  # at most one slot goes to a new item
            matches = []
            for when in (before, after):
                ruled = _expected(engine, scorer, user, when)
                expected = list(zip(ruled.item_ids.tolist(), ruled.scores.tolist()))[: len(served)]
                # same items in the same order; scores equal up to the answer's rounding (6 decimals)
                matches.append([i for i, _ in expected] == [i for i, _ in served] and
                               np.allclose([s for _, s in expected], [s for _, s in served], atol=1.5e-6, rtol=0))
            assert any(matches), (user, served)
    finally:
        engine.close()


def test_answers_carry_their_arm_and_the_blend_arm_never_asks_the_ranker(
        ranked_server: Server, feature_ws: Settings, tmp_path: Path) -> None:
    users = personalised_users(feature_ws)
    ranked = _fresh(ranked_server, feature_ws, users[0], 10)
    assert ranked["arm"] == "ranker" and ranked["model_versions"]["ranker"].startswith(f"{BENTO_RANKER_MODEL}:")
    assert ranked["model_versions"]["experiment"] == "test-exp"
    blended = _fresh(ranked_server, feature_ws, users[3], 10)
    assert blended["arm"] == "blend" and blended["degraded"] is False and blended["cold_start"] is False
    # no ranker in the versions: the index only, and the experiment
    assert {k for k in blended["model_versions"] if k.startswith("ranker")} == set()
    assert blended["model_versions"]["index"].startswith(f"{BENTO_INDEX_MODEL}:")
    # the answer is the strategy blend's: what an engine with no ranker at all answers in process
    engine = build_engine(feature_ws, build_index(tmp_path / "index"))
    try:
        assert engine.scoring.scorer is None
        expected = engine.recommend(users[3], 10, use_cache=False)
        assert [(i["item_id"], i["score"]) for i in blended["items"]] == [(i["item_id"], i["score"]) for i in expected.items]
    finally:
        engine.close()
    popular = _fresh(ranked_server, feature_ws, users[4], 10)
    assert popular["arm"] == "popularity" and popular["model_versions"] == {"experiment": "test-exp"}
    assert {i["strategy"] for i in popular["items"]} == {"popular"} and len(popular["items"]) == 10
    # the impression carries the arm too
    row = served_impression(feature_ws.effective_kafka_bootstrap, feature_ws.impressions_topic, blended["request_id"])
    assert row["arm"] == "blend" and dict(row["model_versions"]) == blended["model_versions"]


def test_a_cached_answer_is_served_only_in_its_arm(ranked_server: Server, feature_ws: Settings) -> None:
    user = personalised_users(feature_ws)[3]  # in the blend arm
    fresh = _fresh(ranked_server, feature_ws, user, 10)
    client = redis.Redis.from_url(feature_ws.effective_redis_url)
    deadline = time.monotonic() + 10  # the cache is written off the response path: poll for the hit
    while (hit := ranked_server.call("/recommend", {"user_id": user, "k": 10})[2])["cached"] is False:
        assert time.monotonic() < deadline, "the answer was never cached"
        time.sleep(0.1)
    assert hit["arm"] == "blend" and hit["items"] == fresh["items"] and hit["model_versions"] == fresh["model_versions"]
    # the same entry, marked as computed in the ranker arm (an earlier split of the users): not served
    entry = json.loads(client.get(recs_cache_key(user)))
    entry["arm"] = "ranker"
    entry["model_versions"] = {**entry["model_versions"], "ranker": "ranker:other"}
    client.set(recs_cache_key(user), json.dumps(entry))
    status, _, again = ranked_server.call("/recommend", {"user_id": user, "k": 10})
    assert status == 200 and again["cached"] is False and again["arm"] == "blend", again


@pytest.fixture(scope="module")
def broken_server(feature_ws: Settings, tiny_ranker_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny ranker with its SavedModel replaced by one whose ``serve`` signature takes two
    tensors (an export of another layout): it loads, and fails on every call."""
    import shutil

    import tensorflow as tf

    folder = shutil.copytree(tiny_ranker_dir, tmp_path_factory.mktemp("broken") / "ranker")
    shutil.rmtree(folder / SAVED_MODEL_DIR)

    class OtherLayout(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="user"),
                                      tf.TensorSpec([None, None], tf.float32, name="items")])
        def serve(self, user: Any, items: Any) -> Any:
            return tf.reduce_sum(items, axis=1) + tf.reduce_sum(user)

    tf.saved_model.save(OtherLayout(), str(folder / SAVED_MODEL_DIR))
    home = _store(tmp_path_factory.mktemp("bentoml-broken"), folder)
    # a generous budget: on a loaded machine a failing call must show up as the error it is, not
    # as a timeout (the warm-up fails too, so the budget would otherwise be the floor)
    env = service_env(feature_ws, home, RECSYS_RANKER_TIMEOUT_MS="5000")
    with serve(env, tmp_path_factory.mktemp("serve-broken") / "serve.log") as srv:
        yield srv


def test_a_ranker_failing_at_call_time_gives_the_cosine_fallback_flagged(broken_server: Server,
                                                                        feature_ws: Settings) -> None:
    users = personalised_users(feature_ws)[:3]
    for user in users:
        body = _fresh(broken_server, feature_ws, user, 10)
        assert body["degraded"] is True and body["degraded_reasons"] == ["ranker error"], body
        assert body["model_versions"]["ranker_variant"] == "full" and len(body["items"]) == 10
        # cosine scores in [0, 1] after the rules' multipliers (at most 1.1 x 1.05)
        assert all(0.0 <= i["score"] <= 1.155 for i in body["items"])
    # a degraded answer is never cached: the next request retries the ranker
    assert redis.Redis.from_url(feature_ws.effective_redis_url).get(recs_cache_key(users[0])) is None
    metrics = broken_server.call("/metrics", method="GET")[2]
    assert 'recsys_fallbacks_total{kind="ranker_error"}' in metrics


#: the hung ranker's budget per call: short, so a miss answers soon after it; the ranker never
#: returns, so no budget could make a call succeed
HUNG_BUDGET_MS = 250


@pytest.fixture()
def hung_server(feature_ws: Settings, tiny_ranker_dir: Path, tmp_path: Path) -> Iterator[Server]:
    """The tiny ranker wrapped to block in TensorFlow for every user with an embedding
    (tests.support.hung_ranker): the start-up warm-up (a user without one) runs normally, every
    request's ranker call hangs until teardown. Function-scoped: its server stops after the test."""
    with FifoGate(tmp_path / "gate") as gate:
        home = _store(tmp_path / "bentoml", hanging_ranker(tiny_ranker_dir, tmp_path / "ranker", gate))
        # the warm-up timeout bounds the start-up should the gate ever catch the warm-up too
        env = service_env(feature_ws, home, RECSYS_RANKER_TIMEOUT_MS=str(HUNG_BUDGET_MS),
                          RECSYS_RANKER_WARMUP_TIMEOUT_S="20", RECSYS_RANKER_PRECISION="auto")
        with serve(env, tmp_path / "serve.log") as srv:
            try:
                yield srv
            finally:
                gate.release()  # the stuck ranker threads return (with an error), so the server stops at once


def _timed(server: Server, path: str, body: Any) -> tuple[int, Any, float]:
    start = time.monotonic()
    status, _, answer = server.call(path, body)
    return status, answer, time.monotonic() - start


def test_a_ranker_hanging_past_its_timeout_gives_the_cosine_fallback_and_other_requests_go_on(
        hung_server: Server, feature_ws: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # the start-up was normal: the warm-up's calls returned and the configured budget is in force
    assert "ranker warm-up failed" not in hung_server.log.read_text(errors="replace")
    metrics = hung_server.call("/metrics", method="GET")[2]
    # one sample per worker (labelled by pid in BentoML's multiprocess metrics): 0.25 s
    assert re.search(r"^recsys_ranker_budget_seconds(\{[^}]*\})? 0\.25$", metrics, re.M), metrics
    users = personalised_users(feature_ws)
    client = redis.Redis.from_url(feature_ws.effective_redis_url)
    client.delete(*[recs_cache_key(u) for u in users])
    # a cold-start user (unknown id) never asks the ranker, and its answer is cached: the hits below
    cold = 987_654
    deadline = time.monotonic() + 10  # the cache is written off the response path: poll for the hit
    while (hit := hung_server.call("/recommend", {"user_id": cold, "k": 10})[2])["cached"] is False:
        assert time.monotonic() < deadline, "the cold-start answer was never cached"
        time.sleep(0.1)
    assert hit["cold_start"] is True and hit["degraded"] is False, hit

    # one miss alone: its ranker call runs and hangs; the answer comes after the budget, from the cosine.
    # Time bounds here are about the property itself (the ranker never returns, and the service's
    # own request timeout is 10 s): 5 s is twenty times the budget, room for a loaded 2-core machine
    status, body, took = _timed(hung_server, "/recommend", {"user_id": users[0], "k": 10})
    assert status == 200 and took < 5.0, (status, took, body)
    assert body["degraded"] is True and body["degraded_reasons"] == ["ranker timeout"], body
    assert body["cached"] is False and body["cold_start"] is False and len(body["items"]) == 10
    assert body["model_versions"]["ranker_variant"] == "full"
    assert all(0.0 <= i["score"] <= 1.155 for i in body["items"])  # cosine in [0, 1] x at most 1.1 x 1.05

    # then, with a ranker thread stuck: misses of other users and hits of the cached one, together
    misses = [("/recommend", {"user_id": u, "k": 10}) for u in users[1:7]]
    hits = [("/recommend", {"user_id": cold, "k": 10})] * 6
    with ThreadPoolExecutor(len(misses) + len(hits)) as pool:
        results = list(pool.map(lambda call: _timed(hung_server, *call), misses + hits))
    for status, answer, took in results:
        assert status == 200 and took < 5.0, (status, took, answer)
    for _, answer, _ in results[: len(misses)]:
        # its call hung on a ranker thread, or waited for one; with at most 6 waiting, never "busy"
        assert answer["degraded"] is True and answer["degraded_reasons"] == ["ranker timeout"], answer
        assert len(answer["items"]) == 10
    for _, answer, _ in results[len(misses):]:
        assert answer["cached"] is True and answer["degraded"] is False and answer["items"] == hit["items"], answer
    # a degraded answer is never cached: the next request asks the (still hung) ranker again
    assert client.get(recs_cache_key(users[0])) is None
    status, again, _ = _timed(hung_server, "/recommend", {"user_id": users[0], "k": 10})
    assert status == 200 and again["degraded_reasons"] == ["ranker timeout"], again
    metrics = hung_server.call("/metrics", method="GET")[2]
    assert 'recsys_fallbacks_total{kind="ranker_timeout"} 8.0' in metrics  # 1 + 6 + 1 misses
    assert 'kind="ranker_error"' not in metrics and 'kind="ranker_busy"' not in metrics
