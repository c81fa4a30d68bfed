"""A/B experiments: the declared experiment's checks and file, the salted assignment (stable per
user, shares kept over 10,000 users), the model versions of each arm's answers, and the cache
serving a cached answer only to the arm that computed it (pure logic); arms that pin model
versions, checked against a real BentoML model store, and served by a real `bentoml serve` (each
arm's answers carry its pinned index; a promotion moves the arm that follows the champion only)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from bentos.answer import Recommendation
from bentos.arm_engines import build_engines
from bentos.breaker import RedisBreaker
from bentos.cache import RecommendationCache, cache_payload
from bentos.factory import describe_models
from bentos.experiments import (
    ArmModels,
    ArmPolicy,
    Experiment,
    ExperimentError,
    arm_versions,
    check_pins,
    experiment_of,
    load_experiment,
    serving_experiment,
)
from models.champion import ModelSet, write_champion
from models.names import BENTO_INDEX_MODEL
from models.tracking import get_bentoml_model, save_to_bentoml
from recsys.config import Settings
from recsys.schema import recs_cache_key
from tests.support.experiments import experiment_file
from tests.support.service_process import Server, serve, service_env
from tests.support.serving import build_index, personalised_users, wait_until

THREE_ARMS = {"name": "ranking-vs-blend", "salt": "2026-12",
              "arms": [{"name": "ranker", "share": 0.5, "mode": "ranker"},
                       {"name": "blend", "share": 0.3, "mode": "blend"},
                       {"name": "popularity", "share": 0.2, "mode": "popularity"}]}
VERSIONS = {"index": "item_index:a", "index_mlflow_run": "r1", "ranker": "ranker:b", "ranker_mlflow_run": "r2",
            "ranker_variant": "full"}


def _experiment(**changes: object) -> Experiment:
    return Experiment.model_validate({**THREE_ARMS, **changes})


def test_the_bucket_is_the_salted_blake2b_and_the_arm_its_cumulative_share() -> None:
    two = _experiment(salt="s", arms=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}])
    # blake2b("s:1", 8 bytes) = 0x4981817ab10ef6ee -> 0x4981.../2**64 = 0.2871 (0x49/256 = 0.285) < 0.5: a
    assert hashlib.blake2b(b"s:1", digest_size=8).hexdigest() == "4981817ab10ef6ee"
    assert two.bucket(1) == pytest.approx(0x4981817ab10ef6ee / 2**64) and two.assign(1).name == "a"
    # blake2b("s:2") = 0xdac0ca4ad614268b -> 0.8545 >= 0.5: b
    assert two.bucket(2) == pytest.approx(0.8545042450624157) and two.assign(2).name == "b"
    assert two.assign(1).mode == "ranker"  # the default mode


def test_the_same_user_always_lands_in_the_same_arm() -> None:
    first, again = _experiment(), Experiment.model_validate(json.loads(json.dumps(THREE_ARMS)))
    users = range(1, 2_001)
    arms = [first.assign(u).name for u in users]
    assert arms == [first.assign(u).name for u in users]  # asked twice
    assert arms == [again.assign(u).name for u in users]  # another instance of the same declaration
    with ThreadPoolExecutor(4) as pool:  # and from other threads (a worker's request threads)
        assert list(pool.map(lambda u: first.assign(u).name, users)) == arms
    reshuffled = _experiment(salt="2027-01")
    assert sum(a != reshuffled.assign(u).name for u, a in zip(users, arms)) > 500  # a new salt reshuffles


def test_shares_hold_over_10000_users() -> None:
    counts = Counter(_experiment().assign(u).name for u in range(1, 10_001))
    # each count is Binomial(10,000, share) for a uniform hash: sd = sqrt(10,000 * s * (1 - s)), i.e.
    # 50 (0.5), 45.8 (0.3), 40 (0.2); the bounds are 4 sd, +-200, around 5,000, 3,000 and 2,000
    assert 4_800 <= counts["ranker"] <= 5_200, counts
    assert 2_800 <= counts["blend"] <= 3_200, counts
    assert 1_800 <= counts["popularity"] <= 2_200, counts
    assert sum(counts.values()) == 10_000


@pytest.mark.parametrize(("changes", "message"), [
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, "sum to 0.9 (a=0.5, b=0.4)"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, "['a'] appear more than once"),
    ({"arms": [{"name": "a", "share": 1.0, "mode": "random"}]}, "mode"),
    ({"arms": [{"name": "a", "share": 0.0}, {"name": "b", "share": 1.0}]}, "share"),
    ({"arms": []}, "arms"),
    ({"salt": ""}, "salt"),
    ({"name": "has space"}, "name"),
    ({"owner": "me"}, "owner"),  # an unknown field (a typo) is refused, not ignored
    ({"arms": [{"name": "a", "share": 1.0, "models": {"item_index": "ranker:v1"}}]},
     "'ranker:v1' is not a tag of the item_index model: write 'item_index:<version>'"),
    ({"arms": [{"name": "a", "share": 1.0, "models": {"ranker": "ranker:"}}]}, "'ranker:' is not a tag of the ranker"),
    ({"arms": [{"name": "a", "share": 1.0, "models": {}}]}, "models pins nothing"),
    ({"arms": [{"name": "a", "share": 1.0, "models": {"als": "als:v1"}}]}, "arms.0.models.als"),
    ({"arms": [{"name": "a", "share": 1.0, "mode": "blend", "models": {"ranker": "ranker:v1"}}]},
     "arm 'a' pins ['ranker'], which mode 'blend' does not use"),
    ({"arms": [{"name": "a", "share": 1.0, "mode": "popularity", "models": {"item_index": "item_index:v1"}}]},
     "arm 'a' pins ['item_index'], which mode 'popularity' does not use"),
])
def test_a_bad_declaration_is_refused_naming_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _experiment(**changes)


def test_decimal_shares_that_sum_to_one_in_decimal_are_accepted() -> None:
    # 0.1 + 0.2 + 0.7 = 0.9999999999999999 in binary floating point: within the tolerance
    arms = [{"name": n, "share": s} for n, s in (("a", 0.1), ("b", 0.2), ("c", 0.7))]
    assert [a.name for a in _experiment(arms=arms).arms] == ["a", "b", "c"]


def test_the_file_is_yaml_or_json_and_named_by_settings(tmp_path: Path) -> None:
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("name: ranking-vs-blend\nsalt: '2026-12'\narms:\n"
                         "  - {name: ranker, share: 0.5}\n  - {name: blend, share: 0.3, mode: blend}\n"
                         "  - {name: popularity, share: 0.2, mode: popularity}\n")
    json_file = tmp_path / "exp.json"
    json_file.write_text(json.dumps(THREE_ARMS))
    assert load_experiment(yaml_file) == load_experiment(json_file) == _experiment()
    assert experiment_of(Settings(home=tmp_path, experiment_file=Path("exp.yaml"))) == _experiment()  # under home
    assert experiment_of(Settings(home=tmp_path)) is None  # none declared


def test_a_missing_or_invalid_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="RECSYS_EXPERIMENT_FILE=.*nope.yaml.* does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsalt: s\narms:\n  - {name: a, share: 0.7}\n")
    with pytest.raises(ExperimentError, match=r"bad.yaml: the file: Value error, arm shares must sum to 1, these sum to 0.7"):
        load_experiment(bad)


def test_each_mode_drops_the_versions_of_the_models_it_does_not_use() -> None:
    exp = _experiment()
    assert arm_versions(VERSIONS, exp.arm("ranker"), exp.name) == {**VERSIONS, "experiment": "ranking-vs-blend"}
    assert arm_versions(VERSIONS, exp.arm("blend"), exp.name) == {
        "index": "item_index:a", "index_mlflow_run": "r1", "experiment": "ranking-vs-blend"}
    assert arm_versions(VERSIONS, exp.arm("popularity"), exp.name) == {"experiment": "ranking-vs-blend"}
    assert arm_versions(VERSIONS, None, None) == VERSIONS  # no experiment: unchanged
    with pytest.raises(KeyError, match="no arm 'other'"):
        exp.arm("other")


# ---- the cache: one entry per user, served only to the arm that computed it -----------------------


def _user_in(exp: Experiment, arm: str) -> int:
    return next(u for u in range(1, 1_000) if exp.assign(u).name == arm)


def _cache(exp: Experiment | None) -> RecommendationCache:
    return RecommendationCache(None, RedisBreaker(1.0), None, 60, VERSIONS, ArmPolicy(exp, VERSIONS))  # type: ignore[arg-type]


def _entry(user: int, arm: str | None, versions: dict[str, str]) -> bytes:
    rec = Recommendation(user, [], False, False, False, versions, arm=arm)
    rec.top = [{"item_id": 7, "score": 0.9, "strategy": "als"}, {"item_id": 8, "score": 0.5, "strategy": "als"}]
    return cache_payload(rec)


def test_a_cached_answer_is_served_only_in_the_arm_that_computed_it() -> None:
    exp = _experiment()
    policy = ArmPolicy(exp, VERSIONS)
    cache = _cache(exp)
    user = _user_in(exp, "blend")
    blend_entry = _entry(user, "blend", policy.versions(exp.arm("blend")))
    hit = cache.from_raw(user, blend_entry, 1)
    assert hit is not None and hit.arm == "blend" and [i["item_id"] for i in hit.items] == [7]
    assert "ranker" not in hit.model_versions and hit.model_versions["experiment"] == "ranking-vs-blend"
    # the same user's entry from the ranker arm (computed under an earlier split): a miss
    assert cache.from_raw(user, _entry(user, "ranker", policy.versions(exp.arm("ranker"))), 1) is None
    # an entry from before the experiment (no arm): a miss; and under another experiment's name: a miss
    assert cache.from_raw(user, _entry(user, None, VERSIONS), 1) is None
    renamed = {**policy.versions(exp.arm("blend")), "experiment": "older"}
    assert cache.from_raw(user, _entry(user, "blend", renamed), 1) is None


def test_without_an_experiment_the_cache_serves_entries_without_an_arm() -> None:
    cache = _cache(None)
    hit = cache.from_raw(5, _entry(5, None, VERSIONS), 2)
    assert hit is not None and hit.arm is None and hit.model_versions == VERSIONS
    assert cache.from_raw(5, _entry(5, "blend", VERSIONS), 2) is None  # an arm's answer, experiment ended


def test_a_file_with_several_problems_names_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsalt: s\narms:\n  - {name: a, share: 1.0, mode: random}\ncolour: red\n")
    with pytest.raises(ExperimentError) as err:
        load_experiment(bad)
    assert "arms.0.mode: Input should be 'ranker', 'blend' or 'popularity'" in str(err.value)
    assert "colour: Extra inputs are not permitted" in str(err.value)


# ---- arms that pin model versions --------------------------------------------------------------------

PINNED = {"name": "pins", "salt": "s", "arms": [{"name": "control", "share": 0.5},
                                                {"name": "treatment", "share": 0.5,
                                                 "models": {"item_index": "v2", "ranker": "ranker:v3"}}]}


def test_a_pin_is_a_tag_of_its_model_and_a_bare_version_is_read_as_one() -> None:
    exp = Experiment.model_validate(PINNED)
    assert exp.arm("control").models is None  # follows the champion
    assert exp.arm("treatment").models == ArmModels(item_index="item_index:v2", ranker="ranker:v3")
    assert exp.arm("treatment").models.pins() == {"item_index": "item_index:v2", "ranker": "ranker:v3"}  # type: ignore[union-attr]


def test_a_routed_arm_carries_its_engines_versions_and_the_cache_keeps_arms_apart() -> None:
    exp = Experiment.model_validate(PINNED)
    policy = ArmPolicy(exp, VERSIONS)
    pinned = {"index": "item_index:v2", "ranker": "ranker:v3"}
    engine = SimpleNamespace(model_versions=pinned)  # pure logic: only its versions are read here
    policy.route("treatment", engine)  # type: ignore[arg-type]
    treatment, control = exp.arm("treatment"), exp.arm("control")
    assert policy.engine(treatment) is engine and policy.engine(control) is None and policy.engine(None) is None
    assert policy.versions(treatment) == {**pinned, "experiment": "pins"}
    assert policy.versions(control) == {**VERSIONS, "experiment": "pins"}  # the champion's
    cache = RecommendationCache(None, RedisBreaker(1.0), None, 60, VERSIONS, policy)  # type: ignore[arg-type]
    user = _user_in(exp, "treatment")
    hit = cache.from_raw(user, _entry(user, "treatment", policy.versions(treatment)), 2)
    assert hit is not None and hit.model_versions["index"] == "item_index:v2"
    # the same arm's entry computed with the champion's models (before the pin): a miss
    assert cache.from_raw(user, _entry(user, "treatment", policy.versions(control)), 2) is None
    with pytest.raises(ValueError, match="cannot route arm 'treatment': no experiment runs"):
        ArmPolicy(None, VERSIONS).route("treatment", engine)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A real BentoML model store with two ``item_index`` versions (a folder of one file: only
    the tags matter to the check)."""
    home = tmp_path_factory.mktemp("bentoml-pins")
    folder = home / "build"
    folder.mkdir()
    (folder / "marker").write_text("x")
    first = save_to_bentoml(BENTO_INDEX_MODEL, folder, run_id="run-1", bentoml_home=home)
    second = save_to_bentoml(BENTO_INDEX_MODEL, folder, run_id="run-2", bentoml_home=home)
    return home, first, second


def test_pins_resolve_in_the_store_and_latest_becomes_a_fixed_version(tiny_store: tuple[Path, str, str]) -> None:
    home, first, second = tiny_store
    exp = Experiment.model_validate({**PINNED, "arms": [
        {"name": "control", "share": 0.5}, {"name": "a", "share": 0.25, "models": {"item_index": first}},
        {"name": "b", "share": 0.25, "models": {"item_index": "latest"}}]})
    checked = check_pins(exp, home)
    assert checked is not None and checked.arm("a").models.item_index == first  # type: ignore[union-attr]
    assert checked.arm("b").models.item_index == second  # type: ignore[union-attr]  # the latest, saved second
    assert checked.arm("control").models is None and check_pins(None, home) is None


def test_a_pin_missing_from_the_store_is_refused_naming_it_and_what_the_store_has(
        tiny_store: tuple[Path, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home, first, second = tiny_store
    declared = {**PINNED, "arms": [{"name": "control", "share": 0.5},
                                   {"name": "treatment", "share": 0.5, "models": {"item_index": "nope"}}]}
    with pytest.raises(ExperimentError) as err:
        check_pins(Experiment.model_validate(declared), home)
    expected = (f"experiment 'pins': arm 'treatment' pins item_index:nope, which the BentoML model store does "
                f"not have (it has item_index: {', '.join(sorted([first, second]))}): pin one of those")
    assert expected in str(err.value)
    # what a service does at start-up: the file is refused with that error, served without an experiment
    (tmp_path / "exp.json").write_text(json.dumps(declared))
    with caplog.at_level(logging.ERROR, logger="bentos.experiments"):
        assert serving_experiment(Settings(home=tmp_path, experiment_file=Path("exp.json")), home) is None
    assert expected in caplog.text and "serving without an experiment" in caplog.text


ARMS = (("control", 0.4, "ranker"), ("pin_b", 0.3, "ranker"), ("pin_c", 0.3, "ranker"))


@dataclass(frozen=True)
class PinnedStore:
    home: Path  # a BentoML home: its model store and champion pointer
    tags: list[str]  # four versions of the workspace's index: A (the champion), B, C, D
    experiment: Path  # control follows the champion, pin_b pins B, pin_c pins C
    users: list[int]  # one user in each arm: control, pin_b, pin_c


@pytest.fixture(scope="module")
def pinned_store(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> PinnedStore:
    home = tmp_path_factory.mktemp("bentoml-pinned")
    folder = build_index(home / "build" / "index")
    tags = [save_to_bentoml(BENTO_INDEX_MODEL, folder, run_id=f"run-{n}", bentoml_home=home) for n in "abcd"]
    write_champion(ModelSet({BENTO_INDEX_MODEL: tags[0]}), home)
    users = personalised_users(feature_ws)[:3]
    exp = tmp_path_factory.mktemp("experiment") / "experiment.json"
    experiment_file(exp, ARMS, dict(zip(users, ("control", "pin_b", "pin_c"))), name="pinned-exp",
                    models={"pin_b": {"item_index": tags[1]}, "pin_c": {"item_index": tags[2]}})
    return PinnedStore(home, tags, exp, users)


def test_engines_of_pinned_arms_share_the_catalogue_and_route_each_arm(pinned_store: PinnedStore,
                                                                       feature_ws: Settings) -> None:
    (a, b, c, _), users = pinned_store.tags, pinned_store.users
    experiment = check_pins(load_experiment(pinned_store.experiment), pinned_store.home)
    champion = describe_models(get_bentoml_model(a, pinned_store.home), None)
    engines = build_engines(feature_ws, champion, experiment, pinned_store.home)
    try:
        default, pin_b, pin_c = engines.engines()
        assert default.model_versions["index"] == a and engines.by_arm == {"pin_b": pin_b, "pin_c": pin_c}
        assert pin_b.catalog is default.catalog and pin_c.client is default.client  # shared, not copied
        assert pin_b.index is not default.index  # each pinned set holds its own index
        # whichever engine is asked, a user is answered by the engine of the user's arm
        for engine in (default, pin_c):
            answers = [engine.recommend(u, 5, use_cache=False) for u in users]
            assert [(r.arm, r.model_versions["index"]) for r in answers] == [("control", a), ("pin_b", b),
                                                                             ("pin_c", c)]
        # an item added while serving reaches the shared catalogue once and every engine's index
        known = int(default.catalog.popular[0])
        item = {"item_id": 990_001, "title": "new", "category_id": int(default.catalog.category_of([known])[0]),
                "tags": [], "price": 1.0, "margin": 0.1, "quality_score": 3.0, "inventory": 1}
        engines.add_item(item)
        assert 990_001 in default.catalog
        assert all(e.index.user_to_item.contains(np.array([990_001]))[0] for e in engines.engines())
    finally:
        engines.close()


@dataclass(frozen=True)
class Pinned:
    server: Server
    home: Path
    tags: list[str]
    users: list[int]


@pytest.fixture(scope="module")
def pinned(pinned_store: PinnedStore, feature_ws: Settings,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pinned]:
    """A real `bentoml serve` on :func:`pinned_store` with its experiment."""
    # a short poll keeps the promotion test short; the property holds at the default 10 s
    env = service_env(feature_ws, pinned_store.home, RECSYS_EXPERIMENT_FILE=str(pinned_store.experiment),
                      RECSYS_MODEL_RELOAD_POLL_S="0.5")
    with serve(env, tmp_path_factory.mktemp("serve-pinned") / "serve.log") as srv:
        yield Pinned(srv, pinned_store.home, pinned_store.tags, pinned_store.users)


def _index_of_answers(server: Server, settings: Settings, users: list[int]) -> list[tuple[str, str]]:
    """(arm, index version) of a fresh answer for each user (other tests may have cached one)."""
    client = redis.Redis.from_url(settings.effective_redis_url)
    out = []
    for user in users:
        client.delete(recs_cache_key(user))
        status, _, body = server.call("/recommend", {"user_id": user, "k": 5})
        assert status == 200 and body["cached"] is False and body["degraded"] is False, body
        assert body["model_versions"]["experiment"] == "pinned-exp"
        out.append((body["arm"], body["model_versions"]["index"]))
    return out


def test_each_arm_is_answered_with_the_index_it_pins(pinned: Pinned, feature_ws: Settings) -> None:
    server, (a, b, c, _), users = pinned.server, pinned.tags, pinned.users
    assert _index_of_answers(server, feature_ws, users) == [("control", a), ("pin_b", b), ("pin_c", c)]
    arms = server.call("/models", {})[2]["arms"]
    assert {name: v["index"] for name, v in arms.items()} == {"control": a, "pin_b": b, "pin_c": c}
    assert arms["pin_b"]["index_mlflow_run"] == "run-b"  # the pinned model's own run, not the champion's
    # the cached copy of a pinned arm's answer is served to that arm with the pinned version
    deadline = time.monotonic() + 10  # the cache is written off the response path: poll for the hit
    while not (hit := server.call("/recommend", {"user_id": users[1], "k": 5})[2])["cached"]:
        assert time.monotonic() < deadline, "the pinned arm's answer was never cached"
        time.sleep(0.05)
    assert hit["arm"] == "pin_b" and hit["model_versions"]["index"] == b


def test_a_promotion_moves_the_arm_that_follows_the_champion_only(pinned: Pinned, feature_ws: Settings) -> None:
    server, (_, b, c, d), users = pinned.server, pinned.tags, pinned.users
    write_champion(ModelSet({BENTO_INDEX_MODEL: d}), pinned.home)
    wait_until(lambda: server.call("/models", {})[2]["model_versions"]["index"] == d, 30,
               "the promotion served (the issue asks for 30 s)")
    assert _index_of_answers(server, feature_ws, users) == [("control", d), ("pin_b", b), ("pin_c", c)]
    arms = server.call("/models", {})[2]["arms"]
    assert {name: v["index"] for name, v in arms.items()} == {"control": d, "pin_b": b, "pin_c": c}
