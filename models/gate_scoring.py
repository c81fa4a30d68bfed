"""How ``recsys retrain``'s gate scores the model sets on its window (:mod:`models.gate`): each
set's ``als`` row and, when it has a ranker, its ``two_stage`` row, on the same window users
(at most ``Settings.gate_max_users``, a seeded sample), then the decision and the comparison.

**The two-stage row** is the offline two-stage evaluation's code path
(:func:`models.ranker.two_stage.candidate_frame` and :func:`~models.ranker.two_stage.rerank`):
the set's retrieval candidates from its ALS factors, their point-in-time features from the
dataset's feature store as of just before each user's first test event (the time the ranker's
own examples are stamped, one microsecond before the label window), re-ranked by the set's
ranker, the set's ALS ranking filling what the candidates leave. The ranker's item statistics
are the ones exported with it (what the service reads), the ranker variant the one the service
would pick (``Settings.ranker_precision``).

**Which ranker.** The champion's is the one its pointer names in the BentoML store. A ranker
trained by this retrain saw the window's test events as labels, so, as for ALS, the gate scores a
refit of the same configuration on the window split's train side (:func:`refit_ranker`); a
ranker carried over from the champion (``--no-ranker``) is scored as it is. A set without a
ranker serves ALS alone: its ``two_stage`` row is None and the comparison says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.als import ALSConfig, Factors, Popularity, fit_als, load_factors
from models.champion import FACTORS_FOLDER, ModelSet
from models.gate import ALS_ROW, TWO_STAGE_ROW, GateDecision, GateWindow, decide_rows, ks_for, served_row, window_eval_set
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from models.protocol import EvalSet, evaluate_top_k, rank_with
from pipelines.cleaning import CleaningConfig
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from models.ranker.examples import ExampleConfig
    from models.ranker.precision import Variant

log = logging.getLogger(__name__)

#: The seed of the window-user sample (``Settings.gate_max_users``): the same window, the same users.
SAMPLE_SEED = 42


@dataclass(frozen=True)
class ScoredSet:
    """One model set as the gate scores it: its ALS ``factors``; ``ranker``, the exported ranker
    folder scored for its two-stage row (None: the set serves ALS alone) in ``variant``
    (``full`` or ``quantized``); ``ranker_source`` says where that ranker comes from, or why
    there is none."""

    factors: Factors
    ranker: Path | None = None
    variant: Variant = "full"
    ranker_source: str = "no ranker: ALS alone"


def stored_ranker(tag: str | None, settings: Settings,
                  bentoml_home: Path | None) -> tuple[Path | None, Variant, str]:
    """(folder, variant, source) of the BentoML ranker ``tag``; (None, "full", why) when there
    is none to score."""
    if tag is None:
        return None, "full", "no ranker: ALS alone"
    import bentoml

    from models.ranker.precision import choose_variant
    from models.tracking import get_bentoml_model

    try:
        folder = Path(get_bentoml_model(tag, bentoml_home=bentoml_home).path)
    except bentoml.exceptions.NotFound:
        return None, "full", f"no ranker: {tag} is not in the BentoML store, ALS alone"
    return folder, choose_variant(folder, settings.ranker_precision)[0], tag


def champion_set(champion: ModelSet | None, settings: Settings,
                 bentoml_home: Path | None) -> tuple[ScoredSet | None, str]:
    """The champion as the gate scores it (the factors stored in its index model, its ranker),
    or None and why it cannot be scored."""
    import bentoml

    from models.tracking import get_bentoml_model

    if champion is None:
        return None, "no champion yet"
    if BENTO_INDEX_MODEL not in champion.tags:
        return None, "the champion has no index"
    try:
        stored = get_bentoml_model(champion.tags[BENTO_INDEX_MODEL], bentoml_home=bentoml_home)
    except bentoml.exceptions.NotFound:
        return None, f"the champion's {champion.tags[BENTO_INDEX_MODEL]} is not in the BentoML store"
    folder = Path(stored.path) / FACTORS_FOLDER
    if not folder.is_dir():
        return None, "the champion's index model holds no factors to score (built before `recsys retrain`)"
    ranker, variant, source = stored_ranker(champion.tags.get(BENTO_RANKER_MODEL), settings, bentoml_home)
    return ScoredSet(load_factors(folder / "user_embedding", folder / "item_embedding"), ranker, variant, source), ""


def sample_users(eval_set: EvalSet, max_users: int | None, seed: int = SAMPLE_SEED) -> EvalSet:
    """``eval_set`` restricted to ``max_users`` of its users drawn without replacement (seeded),
    kept in their order; the whole set when it has no more (or ``max_users`` is None)."""
    if max_users is None or len(eval_set.users) <= max_users:
        return eval_set
    keep = np.sort(np.random.default_rng(seed).choice(len(eval_set.users), max_users, replace=False))
    return replace(eval_set, users=eval_set.users[keep], positives=tuple(eval_set.positives[i] for i in keep),
                   seen=tuple(eval_set.seen[i] for i in keep), train_counts=eval_set.train_counts[keep])


def _metrics(eval_set: EvalSet, ranked: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """The protocol's ``name@k`` values of ranked catalogue columns, and the users scored."""
    report = evaluate_top_k(eval_set, ranked, ks)
    return {key: float(report[key]) for key in report if "@" in key and isinstance(report[key], float)} | \
        {"users": int(report["users"])}


def score_set(eval_set: EvalSet, window: GateWindow, scored: ScoredSet, popularity: np.ndarray, metric: str,
              feature_settings: Settings, examples: ExampleConfig,
              progress: bool = False) -> dict[str, dict[str, float] | None]:
    """``{"als": metrics, "two_stage": metrics or None}`` of one set on ``eval_set``'s users
    (module docstring); users without an ALS vector are ranked by ``popularity``."""
    ks = ks_for(metric)
    if len(eval_set.users) == 0:
        empty = {f"{name}@{k}": float("nan") for k in ks for name in ("ndcg", "recall")} | {"users": 0}
        return {ALS_ROW: empty, TWO_STAGE_ROW: dict(empty) if scored.ranker is not None else None}
    catalogue, depth = eval_set.catalogue, max(max(ks), 10)
    als_ranked = rank_with(eval_set, scored.factors.score_fn(catalogue, fallback=popularity), depth)
    rows: dict[str, dict[str, float] | None] = {ALS_ROW: _metrics(eval_set, als_ranked, ks), TWO_STAGE_ROW: None}
    if scored.ranker is not None:
        from models.ranker.scorer import RankerScorer
        from models.ranker.two_stage import candidate_frame, rerank

        frame = candidate_frame(scored.factors, window.train_rows, eval_set.users, window.test_times,
                                feature_settings, examples, None, progress)
        ranked = rerank(RankerScorer(scored.ranker, scored.variant), frame, eval_set.users, catalogue, als_ranked,
                        depth, progress)
        rows[TWO_STAGE_ROW] = _metrics(eval_set, ranked, ks)
    return rows


def refit_ranker(settings: Settings, window: GateWindow, items: Any, catalogue: np.ndarray, als: ALSConfig,
                 cleaning: CleaningConfig, kwargs: dict[str, Any], out: Path, progress: bool = False) -> Path:
    """The gate's evaluation fit of the ranker: ``kwargs`` (``config``, ``examples``) as the
    retrain used them, trained on the window split's train side with the dataset's features, and
    exported with that side's item statistics (:func:`models.ranker.two_stage.two_stage` does
    the same on an evaluation's train side)."""
    from models.ranker.examples import item_stats
    from models.ranker.export import export_ranker
    from models.ranker.training import train_ranker_on

    trained = train_ranker_on(window.train, items, catalogue, settings, als, cleaning, kwargs.get("config"),
                              kwargs.get("examples"), progress)
    return export_ranker(trained.fit, out, {"purpose": "gate evaluation fit (window split's train side)"},
                         item_stats=item_stats(window.train))


def gate(settings: Settings, als: ALSConfig, cleaning: CleaningConfig, champion: ScoredSet | None,
         champion_missing_why: str = "no champion yet", *, ranker: tuple[Path | None, Variant, str] | None = None,
         refit: dict[str, Any] | None = None, progress: bool = False) -> tuple[GateDecision, dict[str, Any]]:
    """Score the challenger and the ``champion`` on the window of ``settings`` (its ``as_of`` is
    the reference time) and decide (:func:`models.gate.decide_rows`). The challenger's ALS is an
    evaluation fit of ``als`` on the window split's train side (it must not be judged on test
    events it was trained on). ``ranker``: the challenger's ranker as :func:`stored_ranker`
    gives it (folder, variant, source; None: ALS alone); ``refit``: that ranker was trained by
    this retrain with these kwargs, so a refit on the train side is scored instead
    (:func:`refit_ranker`, exported to a temporary folder). Returns the decision and the comparison."""
    import tempfile

    from pyspark.sql import functions as F

    from models.holdout import clean_to_last_event
    from models.ranker.examples import ExampleConfig
    from recsys.spark import get_spark

    metric = settings.gate_metric
    spark = get_spark(settings, app_name="recsys-retrain")
    events = spark.read.parquet(str(settings.dataset_path / "events")).filter(F.col(S.COL_TS) <= F.lit(settings.as_of))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM)
    catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
    window = window_eval_set(events, catalogue, settings.gate_window_days)
    eval_set = sample_users(window.eval_set, settings.gate_max_users)
    popularity = Popularity.fit(window.train_rows).scores(catalogue)
    cleaned = clean_to_last_event(window.train, cleaning, items)
    ours = ScoredSet(fit_als(cleaned.interactions, als, cleaned.reference_time))
    cleaned.interactions.unpersist()
    folder, variant, source = ranker or (None, "full", "no ranker: ALS alone")
    examples = (refit or {}).get("examples") or ExampleConfig()
    with tempfile.TemporaryDirectory(prefix="recsys-gate-") as work:
        if folder is not None and refit is not None:
            folder = refit_ranker(settings, window, items, catalogue, als, cleaning, refit, Path(work) / "ranker",
                                  progress)
            source = f"an evaluation fit of the retrained ranker's configuration on the window's train side ({source})"
        ours = replace(ours, ranker=folder, variant=variant, ranker_source=source)
        mine = score_set(eval_set, window, ours, popularity, metric, settings, examples, progress)
        theirs = score_set(eval_set, window, champion, popularity, metric, settings, examples, progress) \
            if champion is not None else None
    window.train.unpersist()
    decision = decide_rows(mine, theirs, metric, settings.gate_tolerance, champion_missing_why)
    return decision, {
        "window": window.describe(), "metric": metric, "tolerance": settings.gate_tolerance,
        "sample": {"max_users": settings.gate_max_users, "seed": SAMPLE_SEED, "users": int(len(eval_set.users)),
                   "window_users": int(len(window.eval_set.users))},
        "rankers": {"challenger": ours.ranker_source, "champion": champion.ranker_source if champion else None},
        "rows": {row: {"challenger": mine[row], "champion": theirs[row] if theirs else None}
                 for row in (ALS_ROW, TWO_STAGE_ROW)},
        "decided_by": {"challenger": decision.challenger_row, "champion": decision.champion_row},
        # the deciding rows, side by side (what each set would serve)
        "challenger": mine[served_row(mine)],
        "champion": theirs[served_row(theirs)] if theirs else None,
    }
