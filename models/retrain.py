"""``recsys retrain``: the whole model set retrained on the offline log up to now, registered as the
challenger, gated against the champion (:mod:`models.gate`) and promoted or not.

Steps, in order: clean -> ALS (:func:`models.train.train_als`, not exported over the served
embedding tables) -> ranker (:func:`models.ranker.job.train_ranker`; skipped with
``ranker=False``, the champion's ranker is then carried over) -> the FAISS indexes, with the ALS
factors stored inside the ``item_index`` model (:data:`models.champion.FACTORS_FOLDER`) -> one
MLflow run (params, metrics, artifacts, the registered ALS, index and ranker versions, alias
``challenger``) -> the BentoML models (labelled with the run id) -> the gate -> on promotion the
champion pointer and the MLflow alias ``champion`` (:mod:`models.champion`), and the factors
exported to the ``user_embedding`` / ``item_embedding`` feature tables (optionally
materialized, so the online user vectors follow the promoted index).

The gate (:mod:`models.gate_scoring`) compares what each set would serve: its ALS candidates
re-ranked by its ranker (the two-stage row), or its ALS alone when it has no ranker, with the ALS
rows beside them. The challenger is scored with evaluation fits of the same ALS and ranker
configurations on the window split's train side (it must not be judged on test events it was
trained on); the promoted models are the fits on every event. The champion is scored with the
factors stored in its index model and its stored ranker. The comparison is written as JSON, logged
to the run (``gate/``) and its path returned.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from models.als import ALSConfig, Factors, embedding_table_path, export_factors
from models.champion import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    FACTORS_FOLDER,
    ModelSet,
    read_champion,
    set_alias,
    write_champion,
)
from models.gate import ROWS, GateDecision
from models.gate_scoring import champion_set, gate, stored_ranker
from models.names import (
    ALS_MODEL_NAME,
    BENTO_INDEX_MODEL,
    BENTO_RANKER_MODEL,
    INDEX_MODEL_NAME,
    RANKER_MODEL_NAME,
    TRAINING_EXPERIMENT,
)
from pipelines.cleaning import CleaningConfig
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from models.ranker.precision import Variant

log = logging.getLogger(__name__)


@dataclass
class RetrainResult:
    """What one retrain did: the cutoff, the challenger, the gate's decision, where the
    comparison went, and the MLflow run."""

    cutoff: datetime
    challenger: ModelSet
    decision: GateDecision
    comparison_path: Path
    run_id: str
    seconds: dict[str, float] = field(default_factory=dict)


def gate_report_path(settings: Settings, run_id: str) -> Path:
    return settings.data_path / "models" / settings.dataset / "retrain" / f"gate-{run_id}.json"


def retrain(settings: Settings, *, ranker: bool = True, als: ALSConfig | None = None,
            cleaning: CleaningConfig | None = None, ranker_kwargs: dict[str, Any] | None = None,
            bentoml_home: Path | None = None, publish_features: bool = True, materialize: bool = False,
            progress: bool = True) -> RetrainResult:
    """Retrain, register the challenger, gate it and promote it or keep the champion (module
    docstring). The reference time is ``settings.as_of``, else now. ``ranker_kwargs`` go to
    :func:`models.ranker.job.train_ranker` (``config``, ``examples``). ``publish_features``:
    on promotion write the factors to the embedding feature tables; ``materialize``: then load
    them into the online store."""
    from models.train import train_als
    from models.tracking import log_training_run, save_to_bentoml

    cutoff = settings.as_of or datetime.now(timezone.utc)
    settings = settings.with_overrides(as_of=cutoff)
    als, cleaning = als or ALSConfig(), cleaning or CleaningConfig()
    work = Path(tempfile.mkdtemp(prefix="recsys-retrain-"))
    steps = tqdm(total=5 if ranker else 4, desc="retrain", unit="step", disable=not progress)
    try:
        previous = _adopt_or_read_champion(bentoml_home)
        steps.set_postfix_str("clean + ALS")
        fitted = train_als(settings, als, cleaning, export=False, progress=progress)
        steps.update()
        ranker_dir = None
        if ranker:
            steps.set_postfix_str("ranker")
            ranker_dir = _train_ranker(settings, als, cleaning, work / "ranker", ranker_kwargs or {}, progress)
            steps.update()
        steps.set_postfix_str("index")
        index_dir, index_report = build_index_folder(settings, fitted.factors, work / "index")
        steps.update()
        steps.set_postfix_str("MLflow + BentoML")
        run = log_training_run(
            settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"retrain-{settings.dataset}",
            _params(settings, fitted.config, cleaning, ranker), _metrics(fitted.factors, fitted.seconds),
            _fingerprint(settings, cutoff), artifacts={"index": index_dir, **({"ranker": ranker_dir} if ranker_dir else {})},
            models=_model_specs(index_dir, ranker_dir))
        challenger = _store(run.run_id, run.registered, index_dir, index_report, ranker_dir, previous, settings,
                            bentoml_home, save_to_bentoml)
        set_alias(settings.effective_mlflow_uri, run.registered, CHALLENGER_ALIAS)
        steps.update()
        steps.set_postfix_str("gate")
        champion, why = champion_set(previous, settings, bentoml_home)
        decision, comparison = gate(settings, fitted.config, cleaning, champion, why,
                                    ranker=_challenger_ranker(settings, challenger, ranker_dir, bentoml_home),
                                    refit=(ranker_kwargs or {}) if ranker_dir is not None else None,
                                    progress=progress)
        steps.update()
        comparison.update({"cutoff": cutoff.isoformat(), "mlflow_run": run.run_id, "challenger_models": challenger.tags,
                           "champion_models": previous.tags if previous else None, "decision": decision.as_dict()})
        path = _record(settings, run.run_id, comparison, decision)
        if decision.promote:
            promoted = replace(challenger, promoted_at=datetime.now(timezone.utc).isoformat(), reason=decision.reason)
            write_champion(promoted, bentoml_home)
            set_alias(settings.effective_mlflow_uri, promoted.registered, CHAMPION_ALIAS)
            if publish_features:
                _publish(settings, fitted.factors, materialize)
        log.info("retrain %s: %s", run.run_id, decision.reason)
        return RetrainResult(cutoff, challenger, decision, path, run.run_id, fitted.seconds)
    finally:
        steps.close()
        shutil.rmtree(work, ignore_errors=True)


# ---- the steps ----------------------------------------------------------------------------------


def _adopt_or_read_champion(bentoml_home: Path | None) -> ModelSet | None:
    """The champion; in a store that has models but no champion yet (trained before promotions
    existed), its latest models become the champion first, so that the challenger saved next is
    never served before the gate passes it."""
    champion = read_champion(bentoml_home)
    if champion is not None:
        return champion
    tags = {name: tag for name in (BENTO_INDEX_MODEL, BENTO_RANKER_MODEL)
            if (tag := _latest_tag(name, bentoml_home)) is not None}
    if not tags:
        return None
    adopted = ModelSet(tags, reason="adopted: the store's latest models before the first retrain")
    write_champion(adopted, bentoml_home)
    return adopted


def _latest_tag(name: str, bentoml_home: Path | None) -> str | None:
    import bentoml

    from models.tracking import get_bentoml_model

    try:
        return str(get_bentoml_model(f"{name}:latest", bentoml_home=bentoml_home).tag)
    except bentoml.exceptions.NotFound:
        return None


def _train_ranker(settings: Settings, als: ALSConfig, cleaning: CleaningConfig, out: Path,
                  kwargs: dict[str, Any], progress: bool) -> Path:
    from models.ranker.job import train_ranker

    return train_ranker(settings, als=als, cleaning=cleaning, out=out, track=False, progress=progress,
                        **kwargs).path


def build_index_folder(settings: Settings, factors: Factors, out: Path) -> tuple[Path, dict[str, Any]]:
    """Both indexes and, inside the same folder, the factors they were built from."""
    from models.index import categories_for
    from models.retrieval import RetrievalIndex
    from pipelines.canonical import read_table

    items = read_table(settings.dataset_path, "items", columns=[S.COL_ITEM, S.COL_CATEGORY])
    category_of = dict(zip(items[S.COL_ITEM].astype(int), items[S.COL_CATEGORY].astype(int)))
    index = RetrievalIndex.build(factors, categories_for(factors.item_ids, category_of))
    path = index.save(out)
    export_factors(factors, path / FACTORS_FOLDER / "user_embedding", path / FACTORS_FOLDER / "item_embedding")
    return path, index.report


def _model_specs(index_dir: Path, ranker_dir: Path | None) -> list[Any]:
    from models.pyfunc import AlsRecommender, SimilarItems
    from models.tracking import RANKER_REQUIREMENTS, ModelSpec

    factors = index_dir / FACTORS_FOLDER
    specs = [ModelSpec(ALS_MODEL_NAME, AlsRecommender(), {"user_embedding": factors / "user_embedding",
                                                          "item_embedding": factors / "item_embedding"}, S.COL_USER),
             ModelSpec(INDEX_MODEL_NAME, SimilarItems(), {"index": index_dir}, S.COL_ITEM)]
    if ranker_dir is not None:
        from models.ranker.pyfunc import RankerModel

        specs.append(ModelSpec(RANKER_MODEL_NAME, RankerModel(), {"ranker": ranker_dir}, None,
                               tuple(RANKER_REQUIREMENTS)))
    return specs


def _store(run_id: str, registered: dict[str, str], index_dir: Path, index_report: dict[str, Any],
           ranker_dir: Path | None, previous: ModelSet | None, settings: Settings, bentoml_home: Path | None,
           save: Any) -> ModelSet:
    """Save the new models to BentoML; the challenger's set (the champion's ranker carried over
    when none was trained)."""
    from models.ranker.export import META_FILE

    meta = {"dataset": settings.dataset, "training_cutoff": settings.as_of.isoformat() if settings.as_of else None}
    tags = {BENTO_INDEX_MODEL: save(BENTO_INDEX_MODEL, index_dir, run_id, bentoml_home=bentoml_home,
                                    metadata={**meta, "report": index_report})}
    versions = dict(registered)
    if ranker_dir is not None:
        meta_path = ranker_dir / META_FILE  # the run id is the version the service reports
        ranker_meta = json.loads(meta_path.read_text())
        ranker_meta.update({"mlflow_run_id": run_id, "version": run_id})
        meta_path.write_text(json.dumps(ranker_meta, indent=2, default=str) + "\n")
        tags[BENTO_RANKER_MODEL] = save(BENTO_RANKER_MODEL, ranker_dir, run_id, bentoml_home=bentoml_home,
                                        metadata={k: v for k, v in ranker_meta.items() if k != "history"})
    elif previous is not None and BENTO_RANKER_MODEL in previous.tags:
        tags[BENTO_RANKER_MODEL] = previous.tags[BENTO_RANKER_MODEL]
        if RANKER_MODEL_NAME in previous.registered:
            versions[RANKER_MODEL_NAME] = previous.registered[RANKER_MODEL_NAME]
    return ModelSet(tags, run_id, versions)


def _challenger_ranker(settings: Settings, challenger: ModelSet, ranker_dir: Path | None,
                       bentoml_home: Path | None) -> tuple[Path | None, Variant, str]:
    """The challenger's ranker for the gate: the one trained now (its variant as the service would
    pick it), else the one carried over from the champion, else none."""
    if ranker_dir is not None:
        from models.ranker.precision import choose_variant

        return (ranker_dir, choose_variant(ranker_dir, settings.ranker_precision)[0],
                f"trained by this retrain ({challenger.tags[BENTO_RANKER_MODEL]})")
    folder, variant, source = stored_ranker(challenger.tags.get(BENTO_RANKER_MODEL), settings, bentoml_home)
    return folder, variant, (f"carried over from the champion ({source})" if folder is not None else source)


def _record(settings: Settings, run_id: str, comparison: dict[str, Any], decision: GateDecision) -> Path:
    """The comparison as JSON beside the models, logged to the run with the decision."""
    from mlflow.tracking import MlflowClient

    path = gate_report_path(settings, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(comparison, indent=2, default=str) + "\n")
    from mlflow.entities import Metric

    client = MlflowClient(settings.effective_mlflow_uri)
    client.log_artifact(run_id, str(path), artifact_path="gate")
    # the deciding rows as gate/<side>/..., every row as gate/<row>/<side>/...
    named = [(f"gate/{side}", comparison[side]) for side in ("challenger", "champion")]
    named += [(f"gate/{row}/{side}", comparison["rows"][row][side]) for row in ROWS for side in ("challenger", "champion")]
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    metrics = [Metric(f"{prefix}/{key.replace('@', '_at_')}", float(value), now, 0)  # MLflow names may not hold '@'
               for prefix, values in named for key, value in (values or {}).items() if np.isfinite(value)]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, "gate_decision", "promoted" if decision.promote else "kept_champion")
    client.set_tag(run_id, "gate_reason", decision.reason)
    return path


def _publish(settings: Settings, factors: Factors, materialize: bool) -> None:
    """The promoted factors as the embedding feature tables (and, with ``materialize``, online)."""
    from datetime import timedelta

    export_factors(factors, embedding_table_path(settings, "user"), embedding_table_path(settings, "item"))
    if materialize:
        from pipelines.feature_store import FeatureStoreError
        from pipelines.feature_store import materialize as load_online

        try:
            load_online(settings, factors.cutoff - timedelta(days=1), factors.cutoff + timedelta(minutes=1),
                        views=[T.USER_EMBEDDING, T.ITEM_EMBEDDING])
        except FeatureStoreError as exc:  # the promotion stands; the online vectors follow later
            log.warning("promoted, but the new ALS vectors are not online yet (%s): run "
                        "`recsys features materialize`", exc)


def _params(settings: Settings, als: ALSConfig, cleaning: CleaningConfig, ranker: bool) -> dict[str, Any]:
    return {**als.params(), "dataset": settings.dataset, "training_cutoff": settings.as_of.isoformat(),
            "ranker": ranker, "cleaning_decay_per_day": cleaning.decay_per_day, "gate_metric": settings.gate_metric,
            "gate_tolerance": settings.gate_tolerance, "gate_window_days": settings.gate_window_days}


def _metrics(factors: Factors, seconds: dict[str, float]) -> dict[str, Any]:
    return {"users": len(factors.user_ids), "items": len(factors.item_ids), **seconds}


def _fingerprint(settings: Settings, cutoff: datetime) -> str:
    from models.tracking import dataset_fingerprint

    return dataset_fingerprint(settings.dataset_path, reference_time=cutoff.isoformat())
