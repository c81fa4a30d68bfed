"""A/B experiments, pure logic: the declared experiment's checks and file, the salted assignment
(stable per user, shares kept over 10,000 users), the model versions of each arm's answers, and
the cache serving a cached answer only to the arm that computed it."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bentos.answer import Recommendation
from bentos.breaker import RedisBreaker
from bentos.cache import RecommendationCache, cache_payload
from bentos.experiments import (
    ArmPolicy,
    Experiment,
    ExperimentError,
    arm_versions,
    experiment_of,
    load_experiment,
)
from recsys.config import Settings

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
