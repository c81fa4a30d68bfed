"""`recsys simulate` against a real `bentoml serve` on the feature workspace: the events it reports
arrive in Kafka, and a user built to love one category clicks that category more."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from pipelines.generator import GeneratorConfig
from pipelines.ground_truth import GroundTruth, dataset_ground_truth, ground_truth
from pipelines.simulator import SimulationConfig, SimulationError, SimulationResult, Simulator
from pipelines.stack import free_port
from recsys.config import Settings
from tests.support.service_process import API_KEY, Server, serve, service_env

LOVER = 3  # a user of the workspace (ids 1..30)


@pytest.fixture(scope="module")
def server(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A lean service: an empty model store, so it answers from content, trending and popularity
    (the simulator needs answers, not good ones), and starts without loading an index."""
    home = tmp_path_factory.mktemp("sim-bentoml")
    with serve(service_env(feature_ws, home), tmp_path_factory.mktemp("sim-serve") / "serve.log") as srv:
        yield srv


def _tail(settings: Settings) -> tuple[KafkaConsumer, dict[TopicPartition, int]]:
    """A consumer of the events topic positioned at its current end (no group: nothing to join)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap, consumer_timeout_ms=1000)
    parts = [TopicPartition(settings.events_topic, p) for p in consumer.partitions_for_topic(settings.events_topic)]
    consumer.assign(parts)
    ends = consumer.end_offsets(parts)
    for tp, offset in ends.items():
        consumer.seek(tp, offset)
    return consumer, ends


@pytest.fixture(scope="module")
def loving_run(server: Server, feature_ws: Settings) -> tuple[SimulationResult, int, list[dict]]:
    """40 requests of user 3, built to love the category of the first item it is shown; returns the
    run, that category and the events that reached Kafka during the run."""
    truth = dataset_ground_truth(feature_ws.dataset_path)
    status, _, answer = server.call("/recommend", {"user_id": LOVER, "k": 10})
    assert status == 200, answer
    loved = int(truth.categories([answer["items"][0]["item_id"]])[0])
    truth = truth.with_preferences({LOVER: (loved, loved)})
    consumer, _ = _tail(feature_ws)
    seed = int(uuid.uuid4().int % 10_000)  # this run's session ids are its own
    config = SimulationConfig(requests=40, rate=0, k=10, seed=seed, users=(LOVER,))
    result = Simulator(f"http://127.0.0.1:{server.port}", truth, config, API_KEY).run(progress=False)
    received: list[dict] = []
    deadline = time.monotonic() + 30  # /events waits for Kafka's ack: they are there; this bounds a stall
    while len(received) < result.summary.events_sent and time.monotonic() < deadline:
        for message in consumer:
            event = json.loads(message.value)
            if event.get("session_id") == f"sim-{seed}-{LOVER}":
                received.append(event)
    consumer.close()
    return result, loved, received


def test_the_events_it_reports_arrive_in_kafka(loving_run: tuple[SimulationResult, int, list[dict]]) -> None:
    result, _, received = loving_run
    summary = result.summary
    assert summary.requests == 40 and summary.failed_requests == 0 and summary.events_failed == 0
    assert summary.overall.impressions == 400  # 40 answers of 10 items
    assert summary.events_sent == len(received) > 0
    kinds = Counter(e["event_type"] for e in received)
    assert kinds["CLICK"] == summary.overall.clicks and kinds["PURCHASE"] == summary.overall.purchases
    assert kinds["ADD_TO_CART"] >= kinds["PURCHASE"]  # the funnel: no purchase without a cart
    clicked = {(i.item_id, i.request) for i in result.interactions if i.clicked}
    assert len(clicked) == summary.overall.clicks
    with_id = [e for e in received if e.get("request_id")]
    # answers that carry a request_id get it back with the position; answers without one, neither
    assert len(with_id) == (len(received) if summary.with_request_id else 0)
    assert all(1 <= e["position"] <= 10 for e in with_id)


def test_a_user_who_loves_a_category_clicks_it_more(loving_run: tuple[SimulationResult, int, list[dict]],
                                                    feature_ws: Settings) -> None:
    result, loved, _ = loving_run
    truth = dataset_ground_truth(feature_ws.dataset_path)
    shown = result.interactions
    cats = truth.categories([i.item_id for i in shown])
    in_loved = [i for i, c in zip(shown, cats) if c == loved]
    others = [i for i, c in zip(shown, cats) if c != loved]
    assert in_loved and others
    ctr_loved = sum(i.clicked for i in in_loved) / len(in_loved)
    ctr_other = sum(i.clicked for i in others) / len(others)
    # true CTRs: p_click = 0.3 in the loved category; 0.3 * 0.3 * share / (0.7 + 0.3 * share_loved),
    # at most 0.3 * 0.3 / 0.7 = 0.13 elsewhere (seeded: the draws are the same on every run)
    assert ctr_loved > 0.15 and ctr_other < 0.1, (ctr_loved, ctr_other)
    assert ctr_loved > 3 * ctr_other
    assert all(i.click_probability == pytest.approx(0.3) for i in in_loved)


def test_the_command_writes_its_summary(server: Server, feature_ws: Settings, tmp_path: Path) -> None:
    from recsys.cli.simulate import run_simulation

    out = tmp_path / "sim.json"
    payload = run_simulation(feature_ws, requests=5, rate=50, k=4, seed=1, url=f"http://127.0.0.1:{server.port}",
                             api_key=API_KEY, out=out, progress=False)
    assert json.loads(out.read_text()) == payload
    # 5 answers of at most 4 items (an answer may be shorter: the rules may leave fewer on this
    # small shared workspace, whose state other tests change); every shown item is counted once
    assert payload["requests"] == 5 and 5 <= payload["impressions"] <= 20, payload
    group = "per_arm" if "per_arm" in payload else "per_strategy"
    assert sum(g["impressions"] for g in payload[group].values()) == payload["impressions"]
    assert payload["ctr"] == payload["clicks"] / payload["impressions"]


def _tiny_truth() -> GroundTruth:
    return ground_truth(GeneratorConfig(n_users=5, n_items=10, n_categories=2, days=1))


def test_an_unreachable_service_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SimulationError, match=f"the service at {url} is not reachable.*recsys stack up"):
        Simulator(url, _tiny_truth(), SimulationConfig(requests=1), "k").run(progress=False)


def test_a_user_the_dataset_lacks_is_named() -> None:
    with pytest.raises(ValueError, match=r"user 6 is not a user of this dataset.*1\.\.5"):
        Simulator("http://127.0.0.1:1", _tiny_truth(), SimulationConfig(requests=1, users=(6,)), "k")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"requests": None, "seconds": None}, "give requests or seconds"),
    ({"requests": 0}, "requests=0 must be >= 1"),
    ({"rate": -1.0}, "rate=-1.0 must be >= 0"),
    ({"k": 101}, r"k=101 must be within \[1, 100\]"),
    ({"users": ()}, "users must not be empty"),
])
def test_bad_config_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**kwargs)
