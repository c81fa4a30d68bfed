"""A/B experiments of the service: the declared experiment (a name, a salt, arms with traffic shares
and a scoring mode each), read from the YAML or JSON file that ``RECSYS_EXPERIMENT_FILE`` names,
and the deterministic assignment of a user to an arm.

Assignment: ``blake2b("{salt}:{user_id}")``'s first 8 bytes, read as an unsigned big-endian
integer and divided by 2**64, give the user a bucket in [0, 1); the arms, in the file's order,
own consecutive ranges of [0, 1) as wide as their shares. The same salt and user always give the
same arm, in every worker and every process (no state, no randomness); a new salt reshuffles.

An arm's ``mode`` is how its answers are scored: ``ranker`` (today's flow: the ranker, with its
fallbacks), ``blend`` (the same candidates and rules, scored by the strategy blend, the ranker
never called) or ``popularity`` (popular items across categories, the user's purchases removed:
a baseline without personalisation). Answers say which models they used (:func:`arm_versions`):
a ``blend`` arm's carry no ``ranker`` entry, a ``popularity`` arm's neither ``index`` nor
``ranker``, and each carries ``experiment`` with the experiment's name.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recsys.config import Settings

Mode = Literal["ranker", "blend", "popularity"]
MODES: tuple[str, ...] = ("ranker", "blend", "popularity")
#: the ``model_versions`` key that names the experiment an answer was served in
EXPERIMENT_KEY = "experiment"
#: how far the shares may sum from 1 (decimal shares such as 0.1 + 0.2 are not exact in binary)
SHARE_TOLERANCE = 1e-6
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: the ``model_versions`` key prefixes of the models each mode does not use
_UNUSED: dict[str, tuple[str, ...]] = {"ranker": (), "blend": ("ranker",), "popularity": ("ranker", "index")}


class ExperimentError(ValueError):
    """The experiment file is missing or invalid; the message names the file and the fix."""


class Arm(BaseModel):
    """One arm: its name (what answers and impressions carry), its share of users, its mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=_NAME)
    share: float = Field(..., gt=0.0, le=1.0)
    mode: Mode = "ranker"


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
    arm's mode does not use (``blend``: every ``ranker*`` key; ``popularity``: ``index*`` too),
    plus ``experiment``. No arm: the engine's, unchanged."""
    if arm is None:
        return dict(versions)
    dropped = _UNUSED[arm.mode]
    out = {k: v for k, v in versions.items() if not k.startswith(dropped)}  # () drops nothing
    if experiment is not None:
        out[EXPERIMENT_KEY] = experiment
    return out


class ArmPolicy:
    """What the serving stages ask of an experiment: a user's arm (None without an experiment) and
    the ``model_versions`` its answers carry (:func:`arm_versions`, computed once per arm)."""

    def __init__(self, experiment: Experiment | None, versions: dict[str, str]) -> None:
        self.experiment = experiment
        self.base = versions  # the engine's own dict: answers outside an experiment carry it as before
        self._versions = ({a.name: arm_versions(versions, a, experiment.name) for a in experiment.arms}
                          if experiment is not None else {})

    def arm(self, user_id: int) -> Arm | None:
        return self.experiment.assign(user_id) if self.experiment is not None else None

    def versions(self, arm: Arm | None) -> dict[str, str]:
        return self._versions[arm.name] if arm is not None else self.base


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
