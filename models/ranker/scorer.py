"""The exported ranker as the service's ``Scorer`` (:class:`RankerScorer`, loaded by
:func:`load_scorer`): the same :class:`~models.ranker.features.FeatureEncoder` as training turns
one user's features and N candidates' into the ``serve`` signature's tensors, run by the
SavedModel (full precision) or by the int8 TensorFlow Lite variant (models.ranker.precision
says which is served)."""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.ranker.export import ITEM_STATS_FILE, META_FILE, QUANTIZED_FILE, SAVED_MODEL_DIR, SERVE_ENDPOINT
from models.ranker.features import (
    ITEM_EMBEDDING,
    ITEM_STATS,
    USER_EMBEDDING,
    USER_INPUTS,
    USER_LISTS,
    FeatureEncoder,
    column_of,
)
from models.ranker.precision import Variant, choose_variant
from recsys import schema as S
from recsys.arrays import positions

log = logging.getLogger(__name__)


class RankerScorer:
    """The exported ranker as the service's ``Scorer`` (bentos.engine): logits for one user
    (``user``: feature name -> value) against N candidates (``items``: feature name -> N values).
    ``variant``: ``full`` (the SavedModel) or ``quantized`` (the int8 TFLite file); ``version`` is
    the export's (the MLflow run id once tracked), the same for both variants, which the service
    reports beside it (``model_versions["ranker_variant"]``, bentos.factory)."""

    def __init__(self, folder: Path, variant: Variant = "full") -> None:
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        self.encoder = FeatureEncoder(**meta["encoder"])
        self.variant = variant
        self.version = str(meta.get("version") or meta.get("mlflow_run_id") or meta.get("created", "unknown"))
        self.metadata = meta
        if variant == "full":
            import tensorflow as tf

            self._model = tf.saved_model.load(str(folder / SAVED_MODEL_DIR))
            self._serve = concrete_endpoint(getattr(self._model, SERVE_ENDPOINT))
        elif variant == "quantized":
            self._serve = _TFLiteServe(folder / QUANTIZED_FILE)
        else:
            raise ValueError(f"ranker variant {variant!r} is not full or quantized")
        stats_path = folder / ITEM_STATS_FILE
        stats = pd.read_parquet(stats_path).sort_index() if stats_path.is_file() else None
        self._stats_ids = stats.index.to_numpy(np.int64) if stats is not None else np.empty(0, np.int64)
        self._stats = {name: stats[name].to_numpy(np.float64) for name, _ in ITEM_STATS} if stats is not None else {}

    def with_item_stats(self, items: Mapping[str, Sequence[Any]], item_ids: np.ndarray) -> Mapping[str, Sequence[Any]]:
        """``items`` plus the exported :data:`ITEM_STATS` of ``item_ids`` where the caller has none
        (the service; training and evaluation frames carry their own). NaN = unknown = imputed."""
        missing = [name for name, _ in ITEM_STATS if name not in items]
        if not missing or not self._stats:
            return items
        pos, found = positions(self._stats_ids, np.asarray(item_ids, dtype=np.int64))
        return {**items, **{name: np.where(found, self._stats[name][pos], np.nan).tolist() for name in missing}}

    def inputs(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], n: int,
               context: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The ``serve`` endpoint's tensors for one user and ``n`` candidates."""
        enc = self.encoder
        when = (context or {}).get("timestamp") or datetime.now(timezone.utc)
        user_cols = {k: [v] for k, v in user.items()}
        lists = {name: [user.get(name)] * n for name in USER_LISTS}
        return {
            "user": enc.user_matrix(user_cols, [when], 1)[0],
            "items": enc.item_matrix(items, lists, n),
            "item_category": enc.categories(items, n),
            "user_embedding": enc.embeddings([user.get(USER_EMBEDDING)], 1)[0],
            "item_embedding": enc.embeddings(column_of(items, ITEM_EMBEDDING, n), n),
        }

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        """(N,) float64 logits, one per candidate in ``item_ids`` order. ``strategy_scores`` is
        not an input: candidates from different strategies carry incomparable scores."""
        n = len(item_ids)
        if n == 0:
            return np.empty(0, dtype=np.float64)
        out = self._serve(**self.inputs(user, self.with_item_stats(items, item_ids), n, context))
        return np.asarray(out, dtype=np.float64).reshape(n)

    def score_frame(self, frame: pd.DataFrame, progress: bool = False, groups: np.ndarray | None = None) -> np.ndarray:
        """(len(frame),) float64 logits for candidate rows (``user_id``, ``item_id``, feature
        columns named as in :func:`pipelines.feature_store.get_training_frame`, optionally
        ``event_timestamp`` for the context), row-aligned. Each user's rows (or each value of
        ``groups``, row-aligned: one candidate list each) are scored together as one candidate
        list (the list features depend on the list), with the user's features taken from the
        list's first row."""
        out = np.empty(len(frame), dtype=np.float64)
        if not len(frame):
            return out
        from tqdm.auto import tqdm

        user_cols = [c for c in USER_INPUTS if c in frame.columns]
        keys = frame[S.COL_USER].to_numpy() if groups is None else np.asarray(groups)
        lists = pd.Series(np.arange(len(frame))).groupby(keys, sort=False).indices
        for rows in tqdm(lists.values(), total=len(lists), desc="score", unit="list", disable=not progress):
            group = frame.iloc[rows]
            first = group.iloc[0]
            when = first[S.COL_TS] if S.COL_TS in group.columns else None
            out[rows] = self.score({c: first[c] for c in user_cols}, {c: group[c].tolist() for c in group.columns},
                                   group[S.COL_ITEM].to_numpy(np.int64), np.zeros(len(rows)), {"timestamp": when})
        return out


def concrete_endpoint(endpoint: Any) -> Any:
    """The one traced graph behind a restored ``serve`` endpoint, to be called directly (the
    endpoint itself when it holds several). Two reasons: the polymorphic ``tf.function`` call
    takes a lock and, when the arguments do not bind (an export of another layout: a
    ``TypeError``), leaks it, so every later call, from any thread, waits forever (TensorFlow
    2.21, ``polymorphic_function.Function._call``); and its per-call dispatch is skipped. Same
    outputs (tests/models/test_ranker_model.py)."""
    functions = list(getattr(endpoint, "concrete_functions", None) or [])
    return functions[0] if len(functions) == 1 else endpoint


def load_scorer(path: Path, precision: str | None = None) -> RankerScorer:
    """The ranker saved by :func:`export_ranker` (a BentoML model's path works as is), in the
    variant :func:`models.ranker.precision.choose_variant` picks for ``precision`` (``auto``,
    ``full`` or ``quantized``; None: the setting ``RECSYS_RANKER_PRECISION``, default auto)."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / SAVED_MODEL_DIR).is_dir():
        raise FileNotFoundError(f"no ranker at {path}: expected {META_FILE} and {SAVED_MODEL_DIR}/ "
                                "(train one with `recsys train ranker`)")
    if precision is None:
        from recsys.config import load_settings

        precision = load_settings().ranker_precision
    variant, why = choose_variant(path, precision)
    log.info("ranker at %s: serving %s precision (%s)", path, variant, why)
    return RankerScorer(path, variant)


class _TFLiteServe:
    """The int8 TFLite variant's ``serve`` signature, called like the SavedModel's (keyword
    tensors in, logits out). A TFLite interpreter may not be shared between threads, and the
    service calls the ranker from several: one interpreter per calling thread."""

    def __init__(self, path: Path) -> None:
        self.model = Path(path).read_bytes()
        self._local = threading.local()

    def _runner(self) -> Any:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            import tensorflow as tf

            with warnings.catch_warnings():  # tf.lite.Interpreter warns of its future move to LiteRT
                warnings.simplefilter("ignore")
                interpreter = tf.lite.Interpreter(model_content=self.model, num_threads=1)
            runner = self._local.runner = interpreter.get_signature_runner(SERVE_ENDPOINT)
        return runner

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        out = self._runner()(**{k: np.asarray(v) for k, v in inputs.items()})
        return next(iter(out.values()))
