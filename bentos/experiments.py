"""A/B experiments of the service: the declared experiment (a name, a salt, arms with traffic shares,
a scoring mode and optionally pinned model versions each), read from the YAML or JSON file that
``RECSYS_EXPERIMENT_FILE`` names, its pins checked against the BentoML model store, and the
deterministic assignment of a user to an arm.

Assignment: ``blake2b("{salt}:{user_id}")``'s first 8 bytes, read as an unsigned big-endian
integer and divided by 2**64, give the user a bucket in [0, 1); the arms, in the file's order,
own consecutive ranges of [0, 1) as wide as their shares. The same salt and user always give the
same arm, in every worker and every process (no state, no randomness); a new salt reshuffles.

An arm's ``mode`` is how its answers are scored: ``ranker`` (today's flow: the ranker, with its
fallbacks), ``blend`` (the same candidates and rules, scored by the strategy blend, the ranker
never called) or ``popularity`` (popular items across categories, the user's purchases removed:
a baseline without personalisation). Answers say which models they used (:func:`arm_versions`):
a ``blend`` arm's carry no ``ranker`` entry, a ``popularity`` arm's no ``index``, ``two_tower`` or
``ranker``, and each carries ``experiment`` with the experiment's name.

An arm's ``models`` pins BentoML tags (``item_index: item_index:<version>``, ``ranker: ...``,
``two_tower: ...``): its users are served by an engine of those models (:mod:`bentos.arm_engines`),
and its answers carry their versions; a model an arm does not pin follows the champion.
:func:`check_pins` refuses a pin that is not in the model store, naming it and listing what the
store has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL, BENTO_TWO_TOWER_MODEL
from recsys.config import Settings

log = logging.getLogger(__name__)

Mode = Literal["ranker", "blend", "popularity"]
MODES: tuple[str, ...] = ("ranker", "blend", "popularity")
#: the ``model_versions`` key that names the experiment an answer was served in
EXPERIMENT_KEY = "experiment"
#: how far the shares may sum from 1 (decimal shares such as 0.1 + 0.2 are not exact in binary)
SHARE_TOLERANCE = 1e-6
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: the ``model_versions`` key prefixes of the models each mode does not use
_UNUSED: dict[str, tuple[str, ...]] = {"ranker": (), "blend": ("ranker",),
                                       "popularity": ("ranker", "index", "two_tower")}
#: the BentoML models of each ``model_versions`` label (what a mode that drops the label does not use)
_MODEL_OF_LABEL = {"index": BENTO_INDEX_MODEL, "ranker": BENTO_RANKER_MODEL, "two_tower": BENTO_TWO_TOWER_MODEL}


class ExperimentError(ValueError):
    """The experiment file is missing or invalid; the message names the file and the fix."""


class ArmModels(BaseModel):
    """The model versions an arm pins, as BentoML tags of the model store: ``item_index:<version>``
    and ``ranker:<version>`` (a bare ``<version>`` is read as one of the field's model). A model
    left out follows the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_index: str | None = Field(None, min_length=1, max_length=200)
    ranker: str | None = Field(None, min_length=1, max_length=200)
    two_tower: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("item_index", "ranker", "two_tower")
    @classmethod
    def _tag(cls, tag: str | None, info: ValidationInfo) -> str | None:
        if tag is None:
            return None
        model, colon, version = tag.partition(":")
        if not colon:
            return f"{info.field_name}:{tag}"
        if model != info.field_name or not version:
            raise ValueError(f"{tag!r} is not a tag of the {info.field_name} model: "
                             f"write '{info.field_name}:<version>' (`bentoml models list {info.field_name}`)")
        return tag

    @model_validator(mode="after")
    def _some(self) -> ArmModels:
        if not self.pins():
            raise ValueError("models pins nothing: name item_index, ranker and/or two_tower, or drop models")
        return self

    def pins(self) -> dict[str, str]:
        """BentoML model name -> pinned tag, for the models pinned."""
        return {name: tag for name, tag in ((BENTO_INDEX_MODEL, self.item_index),
                                            (BENTO_RANKER_MODEL, self.ranker),
                                            (BENTO_TWO_TOWER_MODEL, self.two_tower)) if tag is not None}


class Arm(BaseModel):
    """One arm: its name (what answers and impressions carry), its share of users, its mode and
    the model versions it pins (None: the champion's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=_NAME)
    share: float = Field(..., gt=0.0, le=1.0)
    mode: Mode = "ranker"
    models: ArmModels | None = None

    @model_validator(mode="after")
    def _pins_used(self) -> Arm:
        unused = [_MODEL_OF_LABEL[label] for label in _UNUSED[self.mode]
                  if self.models is not None and _MODEL_OF_LABEL[label] in self.models.pins()]
        if unused:
            raise ValueError(f"arm {self.name!r} pins {unused}, which mode {self.mode!r} does not use: "
                             "drop those pins or change the mode")
        return self


class Experiment(BaseModel):
    """A declared experiment. Arms take consecutive ranges of [0, 1) in order (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=_NAME)
    salt: str = Field(..., min_length=1, max_length=200)
    arms: tuple[Arm, ...] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _check_arms(self) -> Experiment:
        names = [a.name for a in self.arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"arm names must be unique: {duplicates} appear more than once")
        total = math.fsum(a.share for a in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            shares = ", ".join(f"{a.name}={a.share}" for a in self.arms)
            raise ValueError(f"arm shares must sum to 1, these sum to {total:.6g} ({shares}): adjust them")
        return self

    def bucket(self, user_id: int) -> float:
        """The user's place in [0, 1) under this experiment's salt."""
        digest = hashlib.blake2b(f"{self.salt}:{int(user_id)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def assign(self, user_id: int) -> Arm:
        """The user's arm: the first whose cumulative share exceeds the user's bucket."""
        point, edge = self.bucket(user_id), 0.0
        for arm in self.arms:
            edge += arm.share
            if point < edge:
                return arm
        return self.arms[-1]  # shares summing to a hair under 1: the rest belongs to the last arm

    def arm(self, name: str) -> Arm:
        """The arm called ``name``; KeyError naming the arms there are."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"experiment {self.name!r} has no arm {name!r} (arms: {[a.name for a in self.arms]})")


def arm_versions(versions: Mapping[str, str], arm: Arm | None, experiment: str | None) -> dict[str, str]:
    """The ``model_versions`` of an answer served in ``arm``: the engine's, less the models the
    arm's mode does not use (``blend``: every ``ranker*`` key; ``popularity``: ``index*`` and
    ``two_tower*`` too),
    plus ``experiment``. No arm: the engine's, unchanged."""
    if arm is None:
        return dict(versions)
    dropped = _UNUSED[arm.mode]
    out = {k: v for k, v in versions.items() if not k.startswith(dropped)}  # () drops nothing
    if experiment is not None:
        out[EXPERIMENT_KEY] = experiment
    return out


class ArmEngine(Protocol):
    """What an arm's users are routed to (a :class:`bentos.engine.RecommendationEngine`)."""

    model_versions: dict[str, str]

    def recommend(self, user_id: int, k: int = 10, context: Mapping[str, Any] | None = None,
                  use_cache: bool = True, cache_checked: bool = False) -> Any: ...


class ArmPolicy:
    """What the serving stages ask of an experiment: a user's arm (None without an experiment),
    the engine that serves it (None: this one) and the ``model_versions`` its answers carry
    (:func:`arm_versions`, computed once per arm, of the engine that serves the arm)."""

    def __init__(self, experiment: Experiment | None, versions: dict[str, str]) -> None:
        self.experiment = experiment
        self.base = versions  # the engine's own dict: answers outside an experiment carry it as before
        self._versions = ({a.name: arm_versions(versions, a, experiment.name) for a in experiment.arms}
                          if experiment is not None else {})
        self._engines: dict[str, ArmEngine] = {}

    def arm(self, user_id: int) -> Arm | None:
        return self.experiment.assign(user_id) if self.experiment is not None else None

    def versions(self, arm: Arm | None) -> dict[str, str]:
        return self._versions[arm.name] if arm is not None else self.base

    def route(self, arm_name: str, engine: ArmEngine) -> None:
        """Serve arm ``arm_name`` with ``engine`` (the engine of the models it pins): its answers,
        fresh or cached, carry that engine's versions. Called before the engine serves."""
        if self.experiment is None:
            raise ValueError(f"cannot route arm {arm_name!r}: no experiment runs")
        arm = self.experiment.arm(arm_name)
        self._versions[arm.name] = arm_versions(engine.model_versions, arm, self.experiment.name)
        self._engines[arm.name] = engine

    def engine(self, arm: Arm | None) -> ArmEngine | None:
        """The engine routed to ``arm`` (None: the engine that holds this policy serves it)."""
        return self._engines.get(arm.name) if arm is not None else None


def load_experiment(path: Path) -> Experiment:
    """The experiment declared in ``path`` (YAML, or JSON, which YAML reads too). Raises
    :class:`ExperimentError` naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"RECSYS_EXPERIMENT_FILE={str(path)!r} does not exist: point it at the "
                              "experiment's YAML or JSON file, or unset it to serve without an experiment")
    try:
        body = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        return Experiment.model_validate(body)
    except ValidationError as exc:  # one line per problem, each naming its field
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'the file'}: {e['msg']}" for e in exc.errors())
        raise ExperimentError(f"invalid experiment file {path}: {problems}") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise ExperimentError(f"invalid experiment file {path}: {exc}") from exc


def experiment_of(settings: Settings) -> Experiment | None:
    """The experiment ``settings.experiment_file`` declares (relative to ``home``), else None."""
    if settings.experiment_file is None:
        return None
    return load_experiment(settings.resolve(settings.experiment_file))


def check_pins(experiment: Experiment | None, bentoml_home: Path | None = None) -> Experiment | None:
    """``experiment`` with every pinned tag resolved in the BentoML model store (``$BENTOML_HOME``
    unless ``bentoml_home``; ``item_index:latest`` becomes the version it names now, which then
    stays). Raises :class:`ExperimentError` naming each pin the store lacks and listing the tags
    it has of those models."""
    if experiment is None or not any(a.models is not None for a in experiment.arms):
        return experiment
    import bentoml

    from models.tracking import get_bentoml_model, stored_tags

    missing: list[str] = []
    arms: list[Arm] = []
    for arm in experiment.arms:
        if arm.models is None:
            arms.append(arm)
            continue
        resolved: dict[str, str] = {}
        for name, tag in arm.models.pins().items():
            try:
                resolved[name] = str(get_bentoml_model(tag, bentoml_home).tag)
            except bentoml.exceptions.NotFound:
                missing.append(f"arm {arm.name!r} pins {tag}")
        arms.append(arm.model_copy(update={"models": ArmModels.model_validate(resolved)}) if resolved else arm)
    if missing:
        names = sorted({tag.partition(":")[0] for a in experiment.arms if a.models for tag in a.models.pins().values()})
        has = "; ".join(f"{n}: {', '.join(stored_tags(n, bentoml_home)) or 'none'}" for n in names)
        raise ExperimentError(f"experiment {experiment.name!r}: {'; '.join(missing)}, which the BentoML model store "
                              f"does not have (it has {has}): pin one of those, or save the model there first")
    return experiment.model_copy(update={"arms": tuple(arms)})


def serving_experiment(settings: Settings, bentoml_home: Path | None = None) -> Experiment | None:
    """The experiment a serving process runs: the declared one with its pins resolved
    (:func:`check_pins`). An invalid file or a missing pinned model is logged with the reason and
    the process serves without an experiment (every ``arm`` null): a service degrades, not fails."""
    try:
        experiment = check_pins(experiment_of(settings), bentoml_home)
    except ExperimentError as exc:
        log.error("%s: serving without an experiment", exc)
        return None
    if experiment is not None:
        log.info("experiment %s: arms %s", experiment.name, ", ".join(
            f"{a.name} ({a.mode}, {a.share:g}{', ' + ', '.join(a.models.pins().values()) if a.models else ''})"
            for a in experiment.arms))
    return experiment
