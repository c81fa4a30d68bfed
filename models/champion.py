"""The champion: which stored models the service serves, and the MLflow aliases that name them.

A promotion writes one small pointer record, ``<BentoML home>/recsys/champion.json``, beside the
BentoML model store: the BentoML tag of each promoted model (``item_index``, ``ranker``), the
MLflow run that logged them and their registered versions. The service reads it at start-up and
polls it while running (:mod:`bentos.reload`); it is replaced atomically (a new file renamed over
the old), so a reader sees the old record or the new one, never half of one. No record = no
champion yet: serving falls back to the store's latest models, so stores made before promotions
existed keep working. The registry side is the MLflow registered-model aliases ``challenger``
(every version ``recsys retrain`` registers) and ``champion`` (the promoted ones).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
POINTER_FOLDER = "recsys"
CHAMPION_FILE = "champion.json"
#: Inside a retrained ``item_index`` model: the ALS factors the index was built from (the
#: embedding-table layout of :func:`models.als.export_factors`), which the gate scores.
FACTORS_FOLDER = "factors"


class ChampionError(RuntimeError):
    """The champion pointer is unreadable: its path and what to do are in the message."""


@dataclass(frozen=True)
class ModelSet:
    """Stored models promoted together: ``tags`` (BentoML model name -> ``name:version``), the
    MLflow run that logged them, their registered versions (registered name -> version), when
    and why they were promoted."""

    tags: dict[str, str]
    mlflow_run: str | None = None
    registered: dict[str, str] = field(default_factory=dict)
    promoted_at: str | None = None
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelSet:
        body = json.loads(text)
        tags = body.get("tags")
        if not isinstance(tags, dict) or not all(isinstance(v, str) and ":" in v for v in tags.values()):
            raise ValueError(f"'tags' must map model names to 'name:version' tags, got {tags!r}")
        return cls(dict(tags), body.get("mlflow_run"), dict(body.get("registered") or {}),
                   body.get("promoted_at"), str(body.get("reason") or ""))


def resolve_bentoml_home(bentoml_home: Path | None = None) -> Path:
    """``bentoml_home`` if given, else BentoML's own (``$BENTOML_HOME``, else ``~/bentoml``)."""
    if bentoml_home is not None:
        return Path(bentoml_home)
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def champion_path(bentoml_home: Path | None = None) -> Path:
    return resolve_bentoml_home(bentoml_home) / POINTER_FOLDER / CHAMPION_FILE


def read_champion(bentoml_home: Path | None = None) -> ModelSet | None:
    """The champion, or None when none was promoted yet. Raises :class:`ChampionError` for a
    record that cannot be read (the caller decides: the service keeps what it serves)."""
    path = champion_path(bentoml_home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChampionError(f"cannot read the champion pointer {path}: {exc}") from exc
    try:
        return ModelSet.from_json(text)
    except ValueError as exc:
        raise ChampionError(f"the champion pointer {path} is not a valid record ({exc}): "
                            "run `recsys retrain` again, or delete it to serve the store's latest models") from exc


def write_champion(models: ModelSet, bentoml_home: Path | None = None) -> Path:
    """Replace the champion pointer atomically (write beside it, then rename over it)."""
    path = champion_path(bentoml_home)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".champion-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(models.to_json())
    os.replace(tmp, path)
    log.info("champion is now %s (%s)", models.tags, path)
    return path


def champion_tag(name: str, bentoml_home: Path | None = None) -> str | None:
    """The champion's tag of BentoML model ``name``; None when there is no champion, or it has no
    such model, or the pointer is unreadable (logged)."""
    try:
        champion = read_champion(bentoml_home)
    except ChampionError as exc:
        log.error("%s", exc)
        return None
    return champion.tags.get(name) if champion is not None else None


def set_alias(tracking_uri: str, registered: dict[str, str], alias: str) -> None:
    """Point MLflow registered-model ``alias`` at each ``name -> version`` of ``registered``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name, version in registered.items():
        client.set_registered_model_alias(name, alias, str(version))
    log.info("MLflow alias %r -> %s", alias, registered)


def alias_versions(tracking_uri: str, names: list[str], alias: str) -> dict[str, str]:
    """The versions that ``alias`` points at, for those of ``names`` that have it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            continue
    return out
