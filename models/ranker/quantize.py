"""Full precision against the int8 variant of an exported ranker, side by side
(:func:`compare_precisions`): ndcg@10 on the same candidate lists and the scoring p99 of a
served-size batch, written beside the export as ``quantization.json``, which ``load_scorer``
reads to choose the variant it serves (the rule: :mod:`models.ranker.precision`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from models.ranker.export import QUANTIZATION_FILE, QUANTIZED_FILE
from models.ranker.features import COL_RETRIEVED, list_ids
from models.ranker.listwise import list_ndcg
from models.ranker.precision import QuantizationReport, quantized_is_better
from models.ranker.scorer import RankerScorer
from recsys import schema as S

log = logging.getLogger(__name__)

#: the batch the service scores per request (bentos.config.ServingConfig.n_candidates)
SERVED_BATCH = 150


def compare_precisions(folder: Path, frame: pd.DataFrame, labels: np.ndarray, batch: int = SERVED_BATCH,
                       calls: int = 200) -> QuantizationReport | None:
    """Score the candidate lists of ``frame`` (rows as :meth:`RankerScorer.score_frame` takes
    them; ``labels`` row-aligned, > 0 = relevant; lists by ``list_id`` else by user) with both
    variants of the export in ``folder``; ndcg@10 is :func:`list_ndcg` over the retrieved rows
    (all rows when the frame has no ``retrieved`` column), as the ranker's cross-validation
    measures it. Then time ``calls`` scoring calls of ``batch`` candidates (the first list's rows
    repeated to that size, so the inputs are real), alternating the variants so both see the same
    load. Writes ``folder/quantization.json`` and returns the report; None (and no file) when the
    export has no int8 variant."""
    folder = Path(folder)
    if not (folder / QUANTIZED_FILE).is_file():
        log.warning("no %s in %s: nothing to compare, the service serves full precision", QUANTIZED_FILE, folder)
        return None
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) != len(frame) or not len(frame):
        raise ValueError(f"{len(frame)} frame rows and {len(labels)} labels: pass one label per row, at least one")
    if batch < 1 or calls < 1:
        raise ValueError(f"batch={batch} and calls={calls} must both be >= 1")
    frame = frame.reset_index(drop=True)
    full, quantized = RankerScorer(folder, "full"), RankerScorer(folder, "quantized")
    lists = list_ids(frame)
    retrieved = frame[COL_RETRIEVED].to_numpy(bool) if COL_RETRIEVED in frame else np.ones(len(frame), bool)
    full_logits = full.score_frame(frame, groups=lists)
    quant_logits = quantized.score_frame(frame, groups=lists)
    full_ms, quant_ms = _interleaved_timings(full, quantized, frame, lists, batch, calls)
    report = QuantizationReport(
        full_ndcg=round(list_ndcg(full_logits, labels, lists, retrieved), 6),
        quantized_ndcg=round(list_ndcg(quant_logits, labels, lists, retrieved), 6),
        full_p99_ms=round(float(np.percentile(full_ms, 99)), 4),
        quantized_p99_ms=round(float(np.percentile(quant_ms, 99)), 4),
        lists=int(len(np.unique(lists))), batch=batch, calls=calls,
        max_abs_logit_diff=round(float(np.max(np.abs(full_logits - quant_logits))), 6))
    (folder / QUANTIZATION_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    log.info("ranker precision: full ndcg@10 %.4f, p99 %.3f ms; int8 ndcg@10 %.4f, p99 %.3f ms over %d lists: %s",
             report.full_ndcg, report.full_p99_ms, report.quantized_ndcg, report.quantized_p99_ms, report.lists,
             "the service will serve int8" if quantized_is_better(report) else "the service keeps full precision")
    return report


def _interleaved_timings(full: RankerScorer, quantized: RankerScorer, frame: pd.DataFrame, lists: np.ndarray,
                         batch: int, calls: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per :meth:`RankerScorer.score` call of ``batch`` candidates for each variant,
    the calls alternating (after one untimed call each: graph building, interpreter set-up)."""
    rows = np.flatnonzero(lists == lists[0])
    sample = frame.iloc[np.resize(rows, batch)]
    first = sample.iloc[0]
    user = {c: first[c] for c in sample.columns}
    items = {c: sample[c].tolist() for c in sample.columns}
    ids = sample[S.COL_ITEM].to_numpy(np.int64)
    context = {"timestamp": first[S.COL_TS] if S.COL_TS in sample.columns else None}
    zeros = np.zeros(batch)
    timings: dict[str, list[float]] = {"full": [], "quantized": []}
    for scorer in (full, quantized):
        scorer.score(user, items, ids, zeros, context)
    pair = (("full", full), ("quantized", quantized))
    for call in range(calls):
        for name, scorer in pair if call % 2 == 0 else pair[::-1]:  # neither always runs second
            start = time.perf_counter()
            scorer.score(user, items, ids, zeros, context)
            timings[name].append((time.perf_counter() - start) * 1000.0)
    return np.asarray(timings["full"]), np.asarray(timings["quantized"])
