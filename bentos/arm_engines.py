"""The engines of an experiment whose arms pin model versions: one RecommendationEngine per distinct
set of served models (the champion's, and each set an arm's pins make of it), all sharing the
catalogue, the Redis client and the online feature reader; every engine routes each pinned arm's
users to the engine of that arm's models, so whichever engine a caller holds answers a user with
the models of the user's arm, fresh or cached.

An arm that pins nothing, or whose pins are the champion's own models, is served by the
champion's engine (:attr:`EngineSet.default`). A model an arm does not pin follows the champion.
A promotion builds a whole new set (:func:`build_engines` on the new champion: a fresh catalogue
for every arm, the pinned models reloaded at the same tags), which the hot reload swaps in as one
reference (:mod:`bentos.reload`). Each pinned set holds its own index and ranker in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bentos.cache import MODEL_KEYS
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.experiments import Experiment
from bentos.factory import ServedModels, add_item, build_engine, feature_reader, load_catalog, redis_client, with_pins
from recsys.config import Settings

log = logging.getLogger(__name__)


def model_set(models: ServedModels) -> tuple[str, ...]:
    """What makes two engines the same: the tags of the models they serve."""
    return tuple(models.versions.get(key, "absent") for key in MODEL_KEYS)


@dataclass(frozen=True)
class EngineSet:
    """The champion's engine and the engines of the pinned arms (arm name -> engine; arms served
    by the champion's engine are not listed). ``model_versions`` is the champion engine's: what a
    hot reload compares with the champion pointer."""

    default: RecommendationEngine
    by_arm: Mapping[str, RecommendationEngine] = field(default_factory=dict)

    @property
    def model_versions(self) -> dict[str, str]:
        return self.default.model_versions

    def engines(self) -> list[RecommendationEngine]:
        """Every distinct engine, the champion's first."""
        out = [self.default]
        for engine in self.by_arm.values():
            if all(engine is not e for e in out):
                out.append(engine)
        return out

    def arm_versions(self) -> dict[str, dict[str, str]]:
        """The ``model_versions`` each arm's answers carry (empty without an experiment)."""
        policy = self.default.arms
        if policy.experiment is None:
            return {}
        return {arm.name: dict(policy.versions(arm)) for arm in policy.experiment.arms}

    def add_item(self, item: Mapping[str, Any]) -> str:
        """Add an item to the shared catalogue and every engine's index; returns where the
        champion's index took its vector from (:func:`bentos.factory.add_item`)."""
        source = add_item(self.default, item)
        for engine in self.engines()[1:]:
            add_item(engine, item)  # the catalogue is shared: adding again replaces the same row
        return source

    def close(self) -> None:
        for engine in self.engines():
            engine.close()


def build_engines(settings: Settings, champion: ServedModels, experiment: Experiment | None,
                  bentoml_home: Path | None = None, config: ServingConfig | None = None,
                  client: redis.Redis | None = None) -> EngineSet:
    """The engines serving ``champion`` and each arm of ``experiment`` (its pins resolved by
    :func:`bentos.experiments.check_pins`): one per distinct model set, sharing the catalogue,
    ``client`` and the feature reader, each arm routed to its engine in every engine's
    :class:`~bentos.experiments.ArmPolicy`. A pinned model that cannot be loaded raises: the hot
    reload then keeps the set it serves."""
    client = client or redis_client(settings)
    shared = {"client": client, "catalog": load_catalog(settings), "read_features": feature_reader(settings, client),
              "config": config, "experiment": experiment}
    home = model_set(champion)
    wanted: dict[tuple[str, ...], ServedModels] = {home: champion}
    arm_sets: dict[str, tuple[str, ...]] = {}
    for arm in experiment.arms if experiment is not None else ():
        if arm.models is not None:
            models = with_pins(champion, arm.models.pins(), bentoml_home)
            arm_sets[arm.name] = model_set(models)
            wanted.setdefault(arm_sets[arm.name], models)
    built: dict[tuple[str, ...], RecommendationEngine] = {}
    try:
        for key, models in wanted.items():
            built[key] = build_engine(settings, models.index_dir, models.ranker_dir,
                                      model_versions=models.versions, two_tower_dir=models.two_tower_dir, **shared)
    except BaseException:
        for engine in built.values():  # a half-built set: release what was loaded
            engine.close()
        raise
    by_arm = {name: built[key] for name, key in arm_sets.items() if key != home}
    if len(built) > 1:  # every engine routes every arm: a pinned arm's engine sends the others home
        for engine in built.values():
            for arm in experiment.arms if experiment is not None else ():
                engine.arms.route(arm.name, by_arm.get(arm.name, built[home]))
    if by_arm:
        log.info("pinned arms: %s", ", ".join(f"{name} -> {dict(zip(MODEL_KEYS, arm_sets[name]))}"
                                              for name in by_arm))
    return EngineSet(built[home], by_arm)
