"""Listwise training pieces: rows grouped into padded lists (:func:`to_lists`), the softmax
cross-entropy over one list (:func:`listwise_loss`), a row model applied to lists
(:func:`list_model`), and ndcg@k over candidate lists (:func:`list_ndcg`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras


def list_ndcg(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, rows: np.ndarray | None = None,
              k: int = 10) -> float:
    """Mean ndcg@k over groups (users) of their ``rows`` ranked by ``scores`` (ties: row order),
    binary gains from ``labels``, ideal DCG over min(k, positives); groups without a positive
    are skipped. The protocol's metric, on one user's candidate list instead of the catalogue."""
    rows = np.ones(len(scores), bool) if rows is None else np.asarray(rows, bool)
    scores, labels, groups = np.asarray(scores)[rows], np.asarray(labels)[rows], np.asarray(groups)[rows]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.lexsort((np.arange(len(scores)), -scores, groups))
    values = []
    for group_rows in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1):
        gains = labels[group_rows] > 0
        n_pos = int(gains.sum())
        if n_pos:
            values.append(float(discounts[: min(k, len(gains))] @ gains[:k]) / float(discounts[: min(k, n_pos)].sum()))
    return float(np.mean(values)) if values else 0.0


PAD_LABEL = -1.0  # a padding slot of a list: no score, no target


def to_lists(inputs: Mapping[str, np.ndarray], labels: np.ndarray,
             groups: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows grouped into one padded list per group (user): every input gets shape (lists, L, ...)
    with L the longest list, and labels (lists, L) with :data:`PAD_LABEL` in the padding.
    Lists without a positive are dropped: a softmax over them has no target."""
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    uniques, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    keep = [i for i in range(len(uniques)) if labels[order[starts[i]:starts[i] + counts[i]]].max() > 0]
    length = int(counts.max())
    out = {k: np.zeros((len(keep), length, *v.shape[1:]), dtype=v.dtype) for k, v in inputs.items()}
    targets = np.full((len(keep), length), PAD_LABEL, dtype=np.float32)
    for row, i in enumerate(keep):
        rows = order[starts[i]:starts[i] + counts[i]]
        for k, v in inputs.items():
            out[k][row, : len(rows)] = v[rows]
        targets[row, : len(rows)] = labels[rows]
    return out, targets


def listwise_loss(y_true: Any, y_pred: Any) -> Any:
    """Softmax cross-entropy of one list: the target spreads evenly over the list's positives;
    padding (:data:`PAD_LABEL`) gets no probability and no target."""
    from keras import ops

    valid = y_true > PAD_LABEL / 2
    logits = ops.where(valid, ops.cast(y_pred, "float32"), -1e9)
    positive = ops.where(valid, y_true, 0.0)
    target = positive / ops.maximum(ops.sum(positive, axis=-1, keepdims=True), 1.0)
    return -ops.sum(target * ops.log_softmax(logits, axis=-1), axis=-1)


def list_model(model: keras.Model) -> keras.Model:
    """``model`` (rows -> logits) applied to lists: inputs (B, L, ...) -> logits (B, L). Only
    used to train: the exported model scores rows (one user's candidates) as before."""
    import keras
    from keras import ops

    class ListModel(keras.Model):
        def __init__(self, inner: keras.Model) -> None:
            super().__init__(name="ranker_lists")
            self.inner = inner

        def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
            shape = ops.shape(inputs["user"])
            flat = {k: ops.reshape(v, (-1, *v.shape[2:])) for k, v in inputs.items()}
            return ops.reshape(self.inner(flat, training=training), (shape[0], shape[1]))

    return ListModel(model)
