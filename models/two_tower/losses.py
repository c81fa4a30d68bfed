"""The two training losses on tower vectors, as Keras ops (they run inside the training step and,
on NumPy arrays, in the tests): the in-batch sampled softmax with the logQ correction
(:func:`in_batch_logits`, :func:`softmax_loss`, the sampling probabilities from
:func:`sampling_log_q`) and the sigmoid cross-entropy against sampled negatives
(:func:`bce_loss`). Keras is imported inside functions: importing this module is cheap."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsys.arrays import positions

#: a logit that no softmax gives weight to (finite: -inf * 0 is NaN in the gradient)
MASKED_LOGIT = -1e9


def sampling_log_q(train_items: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n,) float32 log of the probability that an in-batch negative is each of ``items``: the
    item's share of the training rows (a batch is a uniform sample of rows, so an item appears
    as often as it is interacted with). An item absent from training counts once, not zero."""
    ids, counts = np.unique(np.asarray(train_items, dtype=np.int64), return_counts=True)
    pos, found = positions(ids, np.asarray(items, dtype=np.int64))
    count = np.where(found, counts[pos] if len(ids) else 1, 1)
    return np.log(count / max(len(train_items), 1)).astype(np.float32)


def in_batch_logits(user: Any, item: Any, log_q: Any, temperature: float, item_ids: Any | None = None) -> Any:
    """(B, B) float32 logits of an in-batch softmax, row i = user i, column j = row j's item:
    ``user_i . item_j / temperature - log_q_j``. Popular items are the in-batch negatives most
    often; without the correction the model learns to push them down for that alone (Yi et al.
    2019, "Sampling-bias-corrected neural modeling"). With ``item_ids`` (B,), a column j != i
    holding row i's own item is masked (an accidental hit: it is a positive, not a negative)."""
    from keras import ops

    user, item = ops.cast(user, "float32"), ops.cast(item, "float32")
    logits = ops.matmul(user, ops.transpose(item)) / temperature - ops.expand_dims(ops.cast(log_q, "float32"), 0)
    if item_ids is not None:
        same = ops.equal(ops.expand_dims(item_ids, 1), ops.expand_dims(item_ids, 0))
        n = ops.shape(logits)[0]
        hit = ops.logical_and(same, ops.logical_not(ops.cast(ops.eye(n), "bool")))
        logits = ops.where(hit, MASKED_LOGIT, logits)
    return logits


def softmax_loss(user: Any, item: Any, log_q: Any, temperature: float, item_ids: Any | None = None) -> Any:
    """Mean cross-entropy of each row's own item (the diagonal) among the batch's items
    (:func:`in_batch_logits`)."""
    from keras import ops

    logits = in_batch_logits(user, item, log_q, temperature, item_ids)
    return -ops.mean(ops.diagonal(ops.log_softmax(logits, axis=-1)))


def bce_loss(user: Any, positive: Any, negatives: Any, temperature: float, negative_weight: Any) -> Any:
    """Sigmoid cross-entropy of ``user`` (B, D) . ``positive`` (B, D) / temperature as 1 and of
    each of ``negatives`` (B, K, D) as 0, averaged over the B + (weighted) B*K terms;
    ``negative_weight`` (B, K) is 0 for a sampled negative that is the row's own item."""
    from keras import ops

    user = ops.cast(user, "float32")
    pos_logit = ops.sum(user * ops.cast(positive, "float32"), axis=-1) / temperature
    neg_logit = ops.sum(ops.expand_dims(user, 1) * ops.cast(negatives, "float32"), axis=-1) / temperature
    weight = ops.cast(negative_weight, "float32")
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x): stable for large |x|
    total = ops.sum(ops.softplus(-pos_logit)) + ops.sum(weight * ops.softplus(neg_logit))
    return total / (ops.cast(ops.shape(pos_logit)[0], "float32") + ops.sum(weight))
