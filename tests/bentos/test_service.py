"""A real `bentoml serve` process against the real stack: the HTTP contract, bad input, forward-
compatible context, auth, Kafka and Redis outages, and events through the stream changing the next
answer (a view, a purchase)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
import numpy as np
import pytest
from kafka import KafkaConsumer

from models.als import Factors
from models.retrieval import RetrievalIndex
from pipelines.impressions import read_impressions
from pipelines.stack import LocalStack, free_port
from recsys.config import Settings
from tests.support.settings import REPO, isolated_settings
from tests.support.feature_workspace import N_ITEMS, N_USERS, vector
from tests.support.impressions import run_sink_once, table_root
from tests.support.metrics import sample_value
from tests.support.service_process import API_KEY, Server, serve
from tests.support.service_process import service_env as _env


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding an index over the workspace's embeddings."""
    from models.tracking import save_to_bentoml

    home = tmp_path_factory.mktemp("bentoml")
    users, items = np.arange(1, N_USERS + 1), np.arange(1, N_ITEMS + 1)
    factors = Factors(users, np.array([vector(u) for u in users], np.float32), items,
                      np.array([vector(i, 0.1) for i in items], np.float32), datetime(2026, 1, 4, tzinfo=timezone.utc))
    folder = home / "build" / "index"
    RetrievalIndex.build(factors).save(folder)
    save_to_bentoml("item_index", folder, run_id="test-run", bentoml_home=home)
    return home


@pytest.fixture(scope="module")
def server(feature_ws: Settings, bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(_env(feature_ws, bentoml_home), tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv


def test_recommend_answers_with_metadata(server: Server) -> None:
    status, _, body = server.call("/recommend", {"user_id": 3, "k": 5, "context": {"device": "mobile"}})
    assert status == 200, body
    assert len(body["items"]) == 5 and body["degraded"] is False
    assert set(body["items"][0]) == {"item_id", "score", "title", "price", "image_url", "strategy"}
    assert body["model_versions"]["index"].startswith("item_index:")
    assert body["model_versions"]["index_mlflow_run"] == "test-run"
    assert len(body["request_id"]) == 32 and int(body["request_id"], 16) >= 0  # 32 hex digits


def test_unknown_user_is_cold_start(server: Server) -> None:
    status, _, body = server.call("/recommend", {"user_id": 987654})
    assert status == 200 and body["cold_start"] is True and len(body["items"]) == 10


@pytest.mark.parametrize(("body", "field"), [
    ({"user_id": -1}, "user_id"),
    ({"user_id": 1, "k": 0}, "k"),
    ({"user_id": 1, "k": 101}, "k"),
    ({"user_id": "abc"}, "user_id"),
    ({"k": 5}, "user_id"),
    ({"user_id": 1, "context": {"device": "fax"}}, "device"),
    ({"user_id": 1, "context": {"device": "fax", "colour": "red"}}, "device"),  # known keys stay validated
    ({"user_id": 1, "context": {"location": "gb"}}, "location"),
    ({"user_id": 1, "colour": "red"}, "colour"),  # an unknown top-level field is still refused
    ({"user_id": 1, "context": "mobile"}, "context"),
    ({"user_id": 1, "context": {"categories": [-3]}}, "categories"),
])
def test_bad_input_is_a_4xx_naming_the_field(server: Server, body: dict, field: str) -> None:
    status, _, reply = server.call("/recommend", body)
    assert 400 <= status < 500, reply
    assert field in json.dumps(reply)


UNKNOWN_KEYS = "recsys_context_unknown_keys_total"


def test_unknown_context_keys_are_accepted_ignored_and_counted(server: Server) -> None:
    before = server.call("/metrics", method="GET")[2]
    plain = {"user_id": 6, "k": 5, "context": {"device": "mobile"}}
    newer = {"user_id": 6, "k": 5, "context": {"device": "mobile", "colour": "red", "screen": {"w": 390}}}
    status, _, base = server.call("/recommend", plain)
    assert status == 200, base
    status, _, body = server.call("/recommend", newer)
    assert status == 200, body
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in base["items"]]  # ignored
    status, _, accepted = server.call("/events", {"user_id": 6, "item_id": 2, "event_type": "VIEW",
                                                  "context": {"referrer": "search", "app_version": "9.1"}}, key=API_KEY)
    assert status == 200 and accepted["status"] == "accepted", accepted
    status, _, reply = server.call("/events", {"user_id": 6, "item_id": 2, "event_type": "VIEW", "colour": "red"},
                                   key=API_KEY)
    assert status == 400 and "colour" in json.dumps(reply)  # unknown top-level field: refused
    after = server.call("/metrics", method="GET")[2]
    # two unknown keys in the /recommend context (colour, screen), one in the /events context
    assert sample_value(after, UNKNOWN_KEYS, endpoint="recommend") - \
        sample_value(before, UNKNOWN_KEYS, endpoint="recommend") == 2
    assert sample_value(after, UNKNOWN_KEYS, endpoint="events") - \
        sample_value(before, UNKNOWN_KEYS, endpoint="events") == 1
    assert "colour" not in after and "app_version" not in after  # never a raw key as a label


def test_malformed_json_is_a_4xx(server: Server) -> None:
    status, _, _ = server.call("/recommend", raw=b'{"user_id": ')
    assert 400 <= status < 500


def test_similar_items(server: Server) -> None:
    status, _, body = server.call("/similar_items", {"item_id": 5, "k": 3})
    assert status == 200 and len(body["items"]) == 3 and 5 not in [i["item_id"] for i in body["items"]]
    status, _, _ = server.call("/similar_items", {"item_id": 999_999, "k": 3})
    assert status == 404


def test_write_endpoints_need_the_key(server: Server) -> None:
    event = {"user_id": 1, "item_id": 2, "event_type": "VIEW"}
    assert server.call("/events", event)[0] == 401
    assert server.call("/events", event, key="wrong")[0] == 401
    # the key is checked before the body: even garbage gets 401, not 400
    assert server.call("/events", raw=b"not json")[0] == 401
    assert server.call("/items", {"item_id": 1}, key=None)[0] == 401


def test_reads_leave_the_access_log_and_writes_stay_in_it(server: Server) -> None:
    """By default /recommend and /similar_items are not access-logged (RECSYS_ACCESS_LOG_READS:
    about 0.4 ms of the worker's Python each), /events always is."""
    assert server.call("/recommend", {"user_id": 1, "k": 3})[0] == 200
    assert server.call("/events", {"user_id": 1, "item_id": 2, "event_type": "VIEW"})[0] == 401
    deadline = time.monotonic() + 10  # the access log line is written after the response
    while "path=/events" not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the /events request was never access-logged"
        time.sleep(0.1)
    assert "path=/recommend" not in server.log.read_text(errors="replace")


def test_event_reaches_kafka(server: Server, feature_ws: Settings) -> None:
    user = 5000 + int(uuid.uuid4().int % 1000)
    status, _, body = server.call("/events", {"user_id": user, "item_id": 2, "event_type": "CLICK",
                                              "context": {"device": "tablet", "colour": "red"},
                                              "request_id": "a1b2c3", "position": 4}, key=API_KEY)
    assert status == 200 and body["status"] == "accepted"
    consumer = KafkaConsumer(feature_ws.events_topic, bootstrap_servers=feature_ws.effective_kafka_bootstrap,
                             group_id=f"t-{uuid.uuid4().hex}", auto_offset_reset="earliest", consumer_timeout_ms=20000,
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    found = None
    for message in consumer:
        value = json.loads(message.value)
        if value["event_id"] == body["event_id"]:
            found = (message.key, value)
            break
    consumer.close()
    assert found is not None
    key, value = found
    assert key == str(user).encode() and value["event_type"] == "CLICK" and value["item_id"] == 2
    assert value["context"]["device"] == "tablet" and "colour" not in value["context"]  # unknown keys dropped
    assert value["request_id"] == "a1b2c3" and value["position"] == 4  # attribution rides along


def test_bad_event_is_a_4xx(server: Server) -> None:
    status, _, reply = server.call("/events", {"user_id": 1, "item_id": 2, "event_type": "LIKE"}, key=API_KEY)
    assert 400 <= status < 500 and "event_type" in json.dumps(reply)
    status, _, reply = server.call("/events", {"user_id": 1, "item_id": 2, "event_type": "CLICK", "position": 2},
                                   key=API_KEY)
    assert 400 <= status < 500 and "request_id" in json.dumps(reply)  # a position means nothing without it
    status, _, reply = server.call("/events", {"user_id": 1, "item_id": 2, "event_type": "CLICK", "position": 0,
                                               "request_id": "r1"}, key=API_KEY)
    assert 400 <= status < 500 and "position" in json.dumps(reply)


def test_new_item_is_indexed_and_similar(server: Server) -> None:
    item = {"item_id": 90001, "title": "Brand new", "category_id": 2, "tags": ["c2-t1"], "price": 9.5,
            "inventory": 5}
    status, _, body = server.call("/items", item, key=API_KEY)
    assert status == 200 and body["indexed"] is True and "category" in body["embedding_from"]
    status, _, body = server.call("/similar_items", {"item_id": 90001, "k": 3})
    assert status == 200 and len(body["items"]) == 3


def test_metrics_expose_stages_and_cache(server: Server) -> None:
    server.call("/recommend", {"user_id": 4})
    status, _, text = server.call("/metrics", method="GET")
    assert status == 200
    assert "recsys_stage_seconds" in text and "recsys_cache_requests_total" in text


DROPPED = "recsys_impressions_dropped_total"
SENT = "recsys_impressions_sent_total"


def test_every_answer_hits_and_misses_becomes_one_impression(server: Server, feature_ws: Settings,
                                                             tmp_path: Path) -> None:
    """/recommend -> the impression logger -> Kafka -> the sink -> the offline table: one row per
    answer with its items in order (positions 1..n), cache hits included."""
    sent_before = sample_value(server.call("/metrics", method="GET")[2], SENT)
    answers: dict[str, dict] = {}

    def ask(body: dict) -> dict:
        status, _, reply = server.call("/recommend", body)
        assert status == 200, reply
        answers[reply["request_id"]] = reply
        return reply

    ask({"user_id": 987_655, "k": 3})  # cold start
    ask({"user_id": 8, "k": 4})  # a miss
    deadline = time.monotonic() + 10  # the cache is written off the response path: poll for the hit
    while not ask({"user_id": 8, "k": 4})["cached"]:
        assert time.monotonic() < deadline, "the answer was never cached"
        time.sleep(0.1)
    ask({"user_id": 8, "k": 2})  # a hit sliced to 2
    assert {a["cached"] for a in answers.values()} == {True, False}
    deadline = time.monotonic() + 20  # the logger sends off the request path: wait for Kafka's acks
    while sample_value(server.call("/metrics", method="GET")[2], SENT) - sent_before < len(answers):
        assert time.monotonic() < deadline, "the impressions never reached Kafka"
        time.sleep(0.2)
    sink = feature_ws.with_overrides(data_dir=tmp_path / "data")  # a table of this test's own
    run_sink_once(sink, f"imp-{uuid.uuid4().hex[:6]}")
    rows = [r for r in read_impressions(table_root(sink)).to_pylist() if r["request_id"] in answers]
    assert sorted(r["request_id"] for r in rows) == sorted(answers)  # each answer once
    for row in rows:
        reply = answers[row["request_id"]]
        assert row["user_id"] == reply["user_id"]
        assert row["item_ids"] == [i["item_id"] for i in reply["items"]]
        assert row["positions"] == list(range(1, len(reply["items"]) + 1))
        assert row["scores"] == [i["score"] for i in reply["items"]]
        assert row["strategies"] == [i["strategy"] for i in reply["items"]]
        assert (row["cached"], row["cold_start"]) == (reply["cached"], reply["cold_start"])
        assert dict(row["model_versions"]) == reply["model_versions"] and row["arm"] is None


def test_kafka_and_redis_outages(feature_ws: Settings, bentoml_home: Path, tmp_path: Path) -> None:
    """Its own Redis (stopped and restarted mid-test) and a Kafka address where nothing listens."""
    own = isolated_settings(tmp_path)
    stack = LocalStack(own)
    stack.up(["redis"])
    env = _env(feature_ws, bentoml_home, REDIS_URL=own.effective_redis_url,
               KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", RECSYS_IMPRESSIONS_BUFFER="4")
    try:
        with serve(env, tmp_path / "serve.log") as srv:
            status, headers, body = srv.call("/events", {"user_id": 1, "item_id": 2, "event_type": "VIEW"},
                                             key=API_KEY)
            assert status == 503 and headers.get("retry-after") == "5" and body["status"] == "unavailable"
            # impressions: the producer's queue keeps 4 waiting for Kafka (RECSYS_IMPRESSIONS_BUFFER)
            # and the rest are dropped (10 - 4 = 6), while every answer still comes
            for _ in range(10):
                status, _, body = srv.call("/recommend", {"user_id": 1})
                assert status == 200 and len(body["request_id"]) == 32
            # the last answers may still be on their way from the logger's buffer to the producer
            deadline = time.monotonic() + 10
            while (dropped := sample_value(srv.call("/metrics", method="GET")[2], DROPPED, reason="buffer_full")) < 6 \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            assert dropped == 6
            assert srv.call("/recommend", {"user_id": 1})[2]["degraded"] is False
            stack.down(["redis"])
            status, _, body = srv.call("/recommend", {"user_id": 1})
            assert status == 200 and body["degraded"] is True and len(body["items"]) == 10
            stack.up(["redis"])
            deadline = time.monotonic() + 10
            while srv.call("/recommend", {"user_id": 1})[2]["degraded"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert srv.call("/recommend", {"user_id": 1})[2]["degraded"] is False
    finally:
        stack.down()


def test_viewed_items_are_excluded_and_their_neighbours_included(server: Server, feature_ws: Settings) -> None:
    """End to end: events through /events -> Kafka -> the stream consumer -> real-time features ->
    /recommend. The user is new, so everything it knows comes from the stream."""
    from pipelines.stream import StreamOptions, StreamProcessor

    user = 700_000 + int(uuid.uuid4().int % 100_000)
    viewed = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # 12 events: past the cold-start threshold
    for item in viewed:
        status, _, body = server.call("/events", {"user_id": user, "item_id": item, "event_type": "VIEW"},
                                      key=API_KEY)
        assert status == 200, body
        time.sleep(0.002)  # distinct event times: the newest is the last one sent
    StreamProcessor(feature_ws, StreamOptions.from_settings(feature_ws, stop_when_caught_up=True,
                                                            group_id=f"e2e-{uuid.uuid4().hex[:6]}")).run()
    status, _, body = server.call("/recommend", {"user_id": user, "k": 20})
    assert status == 200 and body["cold_start"] is False, body
    ids = [i["item_id"] for i in body["items"]]
    recent = viewed[-5:]  # last_5_items: what the user just viewed is not recommended again
    assert not set(recent) & set(ids)
    status, _, similar = server.call("/similar_items", {"item_id": recent[-1], "k": 10})
    neighbours = {i["item_id"] for i in similar["items"]} - set(recent)
    assert neighbours & set(ids), (ids, neighbours)
    assert "similar" in {i["strategy"] for i in body["items"]}


def test_a_purchase_through_events_removes_the_item_from_the_next_answer(server: Server,
                                                                       feature_ws: Settings) -> None:
    """End to end: PURCHASE through /events -> Kafka -> the stream (the purchased set, the cached
    answer dropped) -> the next /recommend leaves the item out."""
    from pipelines.stream import StreamOptions, StreamProcessor

    user = 17  # a user of the workspace: history and an embedding, so a personalised answer
    status, _, before = server.call("/recommend", {"user_id": user, "k": 10})
    assert status == 200, before
    ids = [i["item_id"] for i in before["items"]]
    bought = next(i for i in ids if i <= N_ITEMS)  # an item of the dataset (the stream's catalogue)
    deadline = time.monotonic() + 10  # the cache is written off the response path: allow it a moment
    while server.call("/recommend", {"user_id": user, "k": 10})[2]["cached"] is not True:
        assert time.monotonic() < deadline, "the answer was never cached"
        time.sleep(0.1)
    status, _, body = server.call("/events", {"user_id": user, "item_id": bought, "event_type": "PURCHASE",
                                              "value": 1.0}, key=API_KEY)
    assert status == 200 and body["status"] == "accepted", body
    StreamProcessor(feature_ws, StreamOptions.from_settings(feature_ws, stop_when_caught_up=True,
                                                            group_id=f"buy-{uuid.uuid4().hex[:6]}")).run()
    status, _, after = server.call("/recommend", {"user_id": user, "k": 10})
    assert status == 200, after
    assert after["cached"] is False  # the stream deleted the cached answer with the purchase
    assert after["items"] and bought not in [i["item_id"] for i in after["items"]], (bought, after["items"])


def test_bentoml_build_packages_the_pinned_models(bentoml_home: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    built = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "bentoml", "get", "recsys:latest", "-o", "json"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60)
    info = json.loads(shown.stdout)
    tags = [m["tag"] for svc in info["services"] for m in svc["models"]]
    assert any(t.startswith("item_index:") for t in tags), info


@pytest.mark.parametrize(("gpus", "declared"), [("0", {}), ("1", {"gpu": 1.0}), ("0.5", {"gpu": 0.5})])
def test_the_service_declares_a_gpu_only_when_configured(gpus: str, declared: dict) -> None:
    """RECSYS_SERVICE_GPUS becomes the service's BentoML ``resources`` (what BentoML's allocator
    turns into CUDA_VISIBLE_DEVICES per worker, and what a containerised deployment reads)."""
    probe = "import bentos.service as s; print(s.Recommender.config.get('resources'))"
    shown = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "RECSYS_SERVICE_GPUS": gpus})
    assert shown.returncode == 0, shown.stderr[-2000:]
    # no GPU: no gpu key, so BentoML never sets CUDA_VISIBLE_DEVICES
    assert shown.stdout.strip().splitlines()[-1] == str(declared)


@pytest.mark.parametrize(("env", "skipped", "excluded"), [
    ({}, True, ["/recommend$", "/similar_items$"]),
    ({"RECSYS_ACCESS_LOG_READS": "true", "RECSYS_TRACE_READS": "true"}, False, []),
])
def test_the_read_routes_observability_follows_the_settings(env: dict[str, str], skipped: bool,
                                                             excluded: list[str]) -> None:
    """The read routes' access log and OpenTelemetry spans are opt-in; BentoML's own skip list stays."""
    probe = ("import json, bentos.service as s; c = s.Recommender.config; "
             "print(json.dumps([c['logging']['access']['skip_paths'], c['tracing']['excluded_urls']]))")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
    assert shown.returncode == 0, shown.stderr[-2000:]
    paths, urls = json.loads(shown.stdout.strip().splitlines()[-1])
    assert {"/metrics", "/healthz", "/livez", "/readyz"} <= set(paths)
    assert ("/recommend" in paths) is skipped
    assert urls == excluded


def test_the_bento_image_carries_the_cuda_runtime() -> None:
    """`bentoml containerize` builds on nvidia/cuda 12.x with cuDNN (TensorFlow 2.21's GPU kernels)."""
    import yaml

    docker = yaml.safe_load((REPO / "bentofile.yaml").read_text())["docker"]
    assert docker["cuda_version"] == "12.6" and docker["distro"] == "debian"
