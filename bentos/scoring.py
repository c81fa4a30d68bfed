"""The scoring stage of /recommend: the :class:`Scorer` protocol (the ranker as the service sees
it), one batched ranker call on the ranker's own executor under a time budget
(bentos.ranker_call), and its fallbacks: the cosine of user and item embeddings when the ranker
times out, fails or is busy, a blend of the strategies' scores with no ranker. Scores leave in
[0, 1], what the business rules expect."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import fasteners
import numpy as np

from bentos import rules
from bentos.candidates.merge import CandidateSet
from bentos.config import ServingConfig
from bentos.features import ITEM_FEATURES, UserFeatures
from bentos.metrics import METRICS
from bentos.ranker_call import RankerBudget, RankerBusy, RankerExecutor, choose_budget, measure_scoring

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """The ranker as the service sees it: logits for one user against a batch of candidates."""

    version: str

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray: ...


class Scoring:
    """Scores candidates with the ranker when there is one, else by the fallbacks (module docstring)."""

    def __init__(self, scorer: Scorer | None, index: Any | None, index_lock: fasteners.ReaderWriterLock,
                 config: ServingConfig) -> None:
        self.scorer = scorer
        self.index = index
        self.index_lock = index_lock  # FAISS may not be read while an item is being added
        self.config = config
        self.executor = RankerExecutor(config.ranker_workers, config.ranker_queue)
        self.budget = self._set_budget(choose_budget(config))  # until calibrate() measures one

    def calibrate(self, item_ids: Sequence[int] | np.ndarray) -> RankerBudget:
        """Warm the ranker up on a full candidate batch of ``item_ids`` (their features imputed,
        as for an unknown user) and set the budget from the measured
        scoring p99 (``choose_budget``); logs the budget and publishes it as the
        ``recsys_ranker_budget_seconds`` gauge. Without a ranker the budget stays as it is."""
        if self.scorer is None:
            return self.budget
        scorer = self.scorer
        ids = np.asarray(item_ids, dtype=np.int64)[: self.config.n_candidates]
        items: dict[str, Any] = {ref.partition(":")[2]: [None] * len(ids) for ref in ITEM_FEATURES}
        items.update(self.recent_similarity({}, ids))
        timings = measure_scoring(self.executor, lambda: scorer.score({}, items, ids, np.zeros(len(ids)), {}),
                                  self.config.ranker_warmup_calls, self.config.ranker_warmup_timeout_s)
        self._set_budget(choose_budget(self.config, timings))
        log.info("ranker budget per call: %s, from %d timed calls of %d candidates",
                 self.budget.describe(), len(timings), len(ids))
        return self.budget

    def close(self) -> None:
        self.executor.shutdown()

    def _set_budget(self, budget: RankerBudget) -> RankerBudget:
        self.budget = budget
        METRICS.ranker_budget.set(budget.seconds)
        return budget

    def score(self, user: UserFeatures, item_feats: Mapping[str, Sequence[Any]] | None, cands: CandidateSet,
              context: Mapping[str, Any], reasons: list[str], use_ranker: bool = True) -> np.ndarray:
        """One score in [0, 1] per candidate. A ranker timeout, error or busy executor (every
        ranker thread taken and its queue full: the ranker is skipped without waiting) is counted,
        gives a reason (the answer is degraded) and falls back to the cosine; without item
        features, a user vector or a ranker, to the blend. ``use_ranker=False`` (an experiment's
        ``blend`` arm): the blend, the ranker never called."""
        ids = np.asarray(cands.item_ids, dtype=np.int64)
        strat_scores = np.asarray(cands.scores, dtype=np.float64)
        if use_ranker and self.scorer is not None and item_feats is not None:
            inputs = {**item_feats, **self.recent_similarity(user.values, ids)}
            try:
                logits = np.asarray(self.executor.call(self.scorer.score, user.values, inputs, ids, strat_scores,
                                                       context, timeout_s=self.budget.seconds), dtype=np.float64)
                if logits.shape == ids.shape and np.isfinite(logits).all():
                    return rules.to_unit(logits, "logit")
                raise ValueError(f"ranker returned shape {logits.shape} or non-finite scores")
            except Exception as exc:  # noqa: BLE001 - any ranker failure degrades, never 500s
                kind = fallback_kind(exc)
                METRICS.fallbacks.labels(kind=kind).inc()
                reasons.append(kind.replace("_", " "))
                log.warning("ranker fell back to cosine (%s): %r", kind, exc)
                cosine = self._cosine(user.vector, item_feats, ids)
                if cosine is not None:
                    return rules.to_unit(cosine, "cosine")
        return blend(cands, self.config.blend_weights)

    def recent_similarity(self, user: Mapping[str, Any], ids: np.ndarray) -> dict[str, list[float]]:
        """The ranker's recent-item inputs (each candidate's best and mean cosine with the user's
        last 5 items) by the training code (models.ranker.recent_similarity) on the index's
        vectors; empty without an index, so the ranker imputes them as in training."""
        from models.ranker import RECENT, recent_matrix, recent_similarity

        if self.index is None or not len(ids):
            return {}
        recent = recent_matrix([user.get("last_5_items")])  # one row: the same list for every candidate
        candidates, _ = self._index_vectors(ids)
        values = recent_similarity(candidates, recent, self._index_vectors)
        return {name: values[:, col].tolist() for col, (name, _) in enumerate(RECENT)}

    def _index_vectors(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, known) of ``item_ids`` from the item-item index (-1 and unknown ids: zeros)."""
        assert self.index is not None
        return self._known_vectors(self.index.item_to_item, item_ids)

    def _known_vectors(self, table: Any, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, known) of ``item_ids`` in one of the index's tables; an id the table does
        not hold (-1, or an item added after the index was built and not yet in this table) gets
        zeros, so a cosine with it is 0 instead of a KeyError failing the request."""
        unique, inverse = np.unique(np.asarray(item_ids, dtype=np.int64), return_inverse=True)
        with self.index_lock.read_lock():
            known = table.contains(unique) & (unique >= 0)
            vectors = np.zeros((len(unique), table.dim), dtype=np.float32)
            if known.any():
                vectors[known] = table.vectors(unique[known])
        return vectors[inverse], known[inverse]

    def _cosine(self, user_vec: np.ndarray | None, item_feats: Mapping[str, Sequence[Any]] | None,
                ids: np.ndarray) -> np.ndarray | None:
        """Cosine of the user vector with each candidate's (index, else online embedding); None
        without a usable user vector or item vectors."""
        if user_vec is None or not np.any(user_vec):
            return None
        if self.index is not None:
            vectors, _ = self._known_vectors(self.index.user_to_item, ids)
        elif item_feats is not None and item_feats.get("item_embedding") is not None:
            vectors = np.array([v if v else np.zeros_like(user_vec) for v in item_feats["item_embedding"]],
                               dtype=np.float32)
        else:
            return None
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(user_vec)
        return np.where(norms > 0, vectors @ user_vec / np.where(norms > 0, norms, 1.0), 0.0)


def fallback_kind(exc: Exception) -> str:
    """The fallback counter's label for a ranker failure (with spaces, the answer's reason)."""
    if isinstance(exc, RankerBusy):
        return "ranker_busy"
    return "ranker_timeout" if isinstance(exc, FutureTimeout) else "ranker_error"


def blend(cands: CandidateSet, weights: Mapping[str, float]) -> np.ndarray:
    """Weighted blend of each strategy's min-max-normalised scores, in [0, 1]."""
    scores = np.asarray(cands.scores, dtype=np.float64)
    strategies = np.asarray(cands.strategies)
    out = np.zeros(len(scores))
    top = max(weights.values()) if weights else 1.0
    for name in set(cands.strategies):
        mask = strategies == name
        s = scores[mask]
        span = s.max() - s.min()
        norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
        out[mask] = norm * weights.get(name, 0.5) / top
    return np.clip(out, 0.0, 1.0)
