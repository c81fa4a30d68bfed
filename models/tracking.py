"""MLflow tracking and registry, and the BentoML model store: the hand-off from training to serving.

Every training run logs its params, metrics, the dataset fingerprint (tag and param
``dataset_fingerprint``) and its artifacts, and registers its models as MLflow pyfunc models
(loading one needs this project installed). The FAISS indexes and the ranker also go to the
BentoML model store, labelled with the MLflow run id; the store is ``$BENTOML_HOME`` (BentoML's
own variable) unless a ``bentoml_home`` is passed, which is how tests keep a temporary store.
This module knows no model: the pyfunc wrappers are in :mod:`models.pyfunc` and
:mod:`models.ranker.pyfunc`, the names in :mod:`models.names`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from models.names import RUN_ID_LABEL
from pipelines.canonical import read_manifest

log = logging.getLogger(__name__)

#: What loading the pyfunc models needs besides this project (kept explicit: inference is slow).
PYFUNC_REQUIREMENTS = ["faiss-cpu==1.15.1", "numpy", "pandas", "pyarrow"]
RANKER_REQUIREMENTS = ["tensorflow==2.21.0", "keras==3.15.1", "numpy", "pandas", "pyarrow"]


def dataset_fingerprint(dataset_dir: Path, **extra: object) -> str:
    """A short stable hash of the canonical dataset (its whole manifest: source, counts, time
    range, parameters; the same hash the demo records) plus ``extra`` (e.g. the reference time)."""
    manifest = asdict(read_manifest(dataset_dir))
    payload = manifest if not extra else {"manifest": manifest, **extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _signature(key: str) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("long", key)]), params=ParamSchema([ParamSpec("k", "long", 10)]))


# ---- logging a run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A pyfunc model to log in the run and register under ``registered_name``."""

    registered_name: str
    python_model: mlflow.pyfunc.PythonModel
    artifacts: Mapping[str, Path]
    #: the one input column (user_id or item_id) of a model with a ``k`` param; None = a frame
    #: of many columns (the ranker's candidate rows), logged without a signature
    input_column: str | None
    requirements: tuple[str, ...] = tuple(PYFUNC_REQUIREMENTS)


@dataclass
class TrackedRun:
    run_id: str
    tracking_uri: str
    experiment: str
    registered: dict[str, str] = field(default_factory=dict)  # registered name -> version


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as MLflow metrics: ``a/b`` for nesting, and ``_at_``
    for ``@`` (``als_ndcg@10`` -> ``als_ndcg_at_10``), which MLflow names may not contain."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace("@", "_at_")
        if isinstance(value, Mapping):
            out.update(_flat_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if np.isfinite(value):
                out[name] = float(value)
    return out


def log_training_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    fingerprint: str,
    artifacts: Mapping[str, Path] | None = None,
    models: list[ModelSpec] | None = None,
    artifact_location: str | None = None,
) -> TrackedRun:
    """One MLflow run: params, metrics (nested dicts are flattened), the dataset fingerprint,
    artifacts (files or folders, under their key) and registered pyfunc models.
    ``artifact_location`` is used when the experiment is created (a server picks its own
    otherwise; a local SQLite store would default to ./mlruns in the current directory)."""
    mlflow.set_tracking_uri(tracking_uri)
    if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tag("dataset_fingerprint", fingerprint)
        mlflow.log_params({"dataset_fingerprint": fingerprint, **{k: str(v) for k, v in params.items()}})
        mlflow.log_metrics(_flat_metrics(metrics))
        for name, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            else:
                mlflow.log_artifact(str(path), artifact_path=name)
        tracked = TrackedRun(run.info.run_id, tracking_uri, experiment)
        for spec in models or []:
            info = mlflow.pyfunc.log_model(
                name=spec.registered_name, python_model=spec.python_model,
                artifacts={k: str(v) for k, v in spec.artifacts.items()},
                signature=_signature(spec.input_column) if spec.input_column else None,
                pip_requirements=list(spec.requirements), registered_model_name=spec.registered_name,
            )
            tracked.registered[spec.registered_name] = str(info.registered_model_version)
    log.info("MLflow run %s in experiment %r (%s); registered %s", tracked.run_id, experiment, tracking_uri,
             tracked.registered or "nothing")
    return tracked


# ---- BentoML model store ----------------------------------------------------------------------


def _model_store(bentoml_home: Path | None) -> Any:
    if bentoml_home is None:
        return None  # BentoML's own store: $BENTOML_HOME, else ~/bentoml
    from bentoml._internal.models.model import ModelStore

    models_dir = Path(bentoml_home) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(models_dir))


def save_to_bentoml(name: str, folder: Path, run_id: str, metadata: Mapping[str, Any] | None = None,
                    bentoml_home: Path | None = None) -> str:
    """Copy ``folder`` into a new BentoML model ``name`` labelled with the MLflow run id; returns
    the tag (``name:version``). Load it with ``bentoml.models.get(tag).path``."""
    import bentoml

    store = _model_store(bentoml_home)
    kwargs = {"_model_store": store} if store is not None else {}
    labels = {RUN_ID_LABEL: run_id}
    with bentoml.models.create(name, labels=labels, metadata=dict(metadata or {}), **kwargs) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True)
    log.info("saved %s to the BentoML model store as %s (label %s=%s)", folder, model.tag, RUN_ID_LABEL, run_id)
    return str(model.tag)


def get_bentoml_model(tag: str, bentoml_home: Path | None = None) -> Any:
    """A model from the store that :func:`save_to_bentoml` wrote to."""
    import bentoml

    store = _model_store(bentoml_home)
    return bentoml.models.get(tag, _model_store=store) if store is not None else bentoml.models.get(tag)


def stored_tags(name: str, bentoml_home: Path | None = None) -> list[str]:
    """The tags of every stored version of BentoML model ``name``, sorted (empty: none stored)."""
    import bentoml

    store = _model_store(bentoml_home)
    try:
        models = bentoml.models.list(name, _model_store=store) if store is not None else bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []
    return sorted(str(m.tag) for m in models)
