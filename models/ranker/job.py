"""``recsys train ranker``: the ranker trained on the active dataset (:func:`train_ranker`),
exported to :func:`ranker_path`, logged to MLflow (registered as a pyfunc model) and saved to the
BentoML model store as the service's ``ranker``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from models.als import ALSConfig
from models.names import BENTO_RANKER_MODEL, RANKER_MODEL_NAME, TRAINING_EXPERIMENT
from models.ranker.config import RankerConfig
from models.ranker.examples import COL_LABEL, ExampleConfig, item_stats
from models.ranker.export import META_FILE, export_ranker
from models.ranker.quantize import compare_precisions
from models.ranker.training import RankerTraining, train_ranker_on
from pipelines.cleaning import CleaningConfig
from recsys import schema as S
from recsys.config import Settings


def ranker_path(settings: Settings) -> Path:
    """``<data_path>/models/<dataset>/ranker/``: where ``recsys train ranker`` exports the ranker."""
    return settings.data_path / "models" / settings.dataset / "ranker"


@dataclass
class RankerTrainResult:
    """What ``recsys train ranker`` did: the training, where the SavedModel went, the cutoff, and
    (when tracked) the MLflow run, registered versions and BentoML tag."""

    training: RankerTraining
    path: Path
    cutoff: datetime
    run_id: str | None = None
    bento_tag: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    registered: dict[str, str] = field(default_factory=dict)  # MLflow registered name -> version
    examples: ExampleConfig = field(default_factory=ExampleConfig)  # how labels became examples


def describe_configuration(result: RankerTrainResult) -> str:
    """What a training used, in numbers (label users kept of those with a positive, epochs,
    folds, negatives), and how that differs from ``recsys train ranker``'s defaults."""
    fit, ex = result.training.fit.config, result.examples
    users = ", ".join(f"{kept:,} of {available:,}" for kept, available in result.training.label_users) or "no"
    used = (f"{users} label users (cap {ex.max_users:,})" if ex.max_users else f"{users} label users (no cap)")
    used += (f", {fit.epochs} epochs, {fit.cv_folds} cv fold{'s' if fit.cv_folds > 1 else ''}, "
             f"{ex.n_hard} hard + {ex.n_random} random negatives per user")
    defaults = {"epochs": (fit.epochs, RankerConfig().epochs), "cv folds": (fit.cv_folds, RankerConfig().cv_folds),
                "max users": (ex.max_users, ExampleConfig().max_users), "n_hard": (ex.n_hard, ExampleConfig().n_hard),
                "n_random": (ex.n_random, ExampleConfig().n_random), "windows": (ex.windows, ExampleConfig().windows)}
    changed = [f"{name} {value} (default {default})" for name, (value, default) in defaults.items() if value != default]
    return used + ("; differs from `recsys train ranker`'s defaults: " + ", ".join(changed) if changed
                   else "; `recsys train ranker`'s defaults")


def train_ranker(settings: Settings, config: RankerConfig | None = None, examples: ExampleConfig | None = None,
                 als: ALSConfig | None = None, cleaning: CleaningConfig | None = None, out: Path | None = None,
                 track: bool = True, bentoml_home: Path | None = None, progress: bool = True) -> RankerTrainResult:
    """Train the ranker on the active dataset's events up to its reference time, with features
    from its feature store (run `recsys features build`/backfill and `recsys features apply`
    first), export the SavedModel, log it to MLflow and save it to BentoML as ``ranker``."""
    from pyspark.sql import functions as F

    from pipelines.canonical import reference_time
    from recsys.spark import get_spark

    started = time.perf_counter()
    cutoff = reference_time(settings.dataset_path, settings.as_of)
    spark = get_spark(settings, app_name="recsys-train-ranker")
    events = spark.read.parquet(str(settings.dataset_path / "events")).filter(F.col(S.COL_TS) <= F.lit(cutoff))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM)
    catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
    training = train_ranker_on(events, items, catalogue, settings, als or ALSConfig(), cleaning or CleaningConfig(),
                               config, examples, progress)
    metadata = {"dataset": settings.dataset, "training_cutoff": cutoff.isoformat()}
    # serving scores with the production ALS, fitted on all events to the cutoff: the item
    # statistics that go with it are those of the same events (as evaluation does for test rows)
    path = export_ranker(training.fit, out or ranker_path(settings), metadata, item_stats=item_stats(events))
    # full precision against int8 on the training lists, side by side: quantization.json beside the export
    compare_precisions(path, training.examples, training.examples[COL_LABEL].to_numpy())
    result = RankerTrainResult(training, path, cutoff, seconds={**training.seconds,
                                                               "ranker_s": round(time.perf_counter() - started, 2)},
                               examples=examples or ExampleConfig())
    if track:
        _track_ranker(settings, result, als or ALSConfig(), examples or ExampleConfig(), bentoml_home)
    return result


def _track_ranker(settings: Settings, result: RankerTrainResult, als: ALSConfig, examples: ExampleConfig,
                  bentoml_home: Path | None) -> None:
    from models.ranker.pyfunc import RankerModel
    from models.tracking import RANKER_REQUIREMENTS, ModelSpec, dataset_fingerprint, log_training_run, save_to_bentoml

    fit = result.training.fit
    params = {**fit.config.params(), **{f"label_{k}": v for k, v in als.params().items()},
              "n_hard": examples.n_hard, "n_random": examples.n_random, "feature_service": examples.feature_service,
              "candidates": str(examples.candidates), "dataset": settings.dataset,
              "training_cutoff": result.cutoff.isoformat(), "device": fit.device}
    metrics = {"rows": fit.rows, "positives": fit.positives, **result.seconds,
               **{f"train_{k}": v[-1] for k, v in fit.history.items() if v}}
    run = log_training_run(settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"ranker-{settings.dataset}", params,
                           metrics, dataset_fingerprint(settings.dataset_path, reference_time=result.cutoff.isoformat()),
                           artifacts={"ranker": result.path},
                           models=[ModelSpec(RANKER_MODEL_NAME, RankerModel(), {"ranker": result.path}, None,
                                             tuple(RANKER_REQUIREMENTS))])
    result.run_id, result.registered = run.run_id, run.registered
    meta_path = result.path / META_FILE  # the run id is the version the service reports
    meta = json.loads(meta_path.read_text())
    meta.update({"mlflow_run_id": run.run_id, "version": run.run_id})
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    result.bento_tag = save_to_bentoml(BENTO_RANKER_MODEL, result.path, run.run_id, bentoml_home=bentoml_home,
                                       metadata={k: v for k, v in meta.items() if k != "history"} | {"metrics": metrics})
