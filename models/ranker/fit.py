"""Fitting the ranker: one fit (:func:`fit_ranker`, listwise or pointwise, on the device that
:mod:`models.ranker.device` picks) and the cross-validated fit over folds of the label users that
bags the fold models and picks the ALS blend (:func:`fit_ranker_cv`).

The model is trained listwise by default: softmax cross-entropy over each user's list (its
label-window positives, the retrieval candidates it will be ranked among, a few random items), so
it learns to order one user's candidates, which is all it is asked to do
(``RankerConfig.loss="pointwise"`` keeps binary cross-entropy). The cross-validated fit picks on
the held-out users how much of the ALS score to add to the logit (``final = blend * z_ALS + logit``).
Keras is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from models.ranker.config import RankerConfig
from models.ranker.device import device_name, device_setup
from models.ranker.features import COL_RETRIEVED, FeatureEncoder, list_ids
from models.ranker.listwise import list_model, list_ndcg, listwise_loss, to_lists
from models.ranker.network import average_model, build_model
from recsys import schema as S

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A fitted ranker: the Keras model (rows -> logits), the encoder that feeds it, its config and
    per-epoch history, the device it trained on and the rows and positives it saw."""

    model: Any  # keras.Model
    encoder: FeatureEncoder
    config: RankerConfig
    history: dict[str, list[float]]
    device: str
    rows: int
    positives: int
    #: Weight of the ALS score (z-scored within the candidate list) added to the logit by the
    #: exported scorer: final = blend * z + logit. Chosen on held-out label users
    #: (:func:`fit_ranker_cv`); 0 = the network alone.
    blend: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)


def _train(trainer: Any, examples: tuple[Any, np.ndarray], batch_size: int, cfg: RankerConfig,
           progress: bool, callbacks: Sequence[Any] = ()) -> Any:
    """``trainer.fit`` on shuffled batches: a ``tf.data`` pipeline (shuffle, batch, prefetch) under
    TensorFlow; under another Keras backend, Keras' own array batching, reshuffled every epoch."""
    import keras

    verbose = 1 if progress else 0
    if keras.config.backend() != "tensorflow":
        return trainer.fit(examples[0], examples[1], batch_size=batch_size, epochs=cfg.epochs, shuffle=True,
                           verbose=verbose, callbacks=list(callbacks))
    import tensorflow as tf

    data = (tf.data.Dataset.from_tensor_slices(examples)
            .shuffle(len(examples[1]), seed=cfg.seed, reshuffle_each_iteration=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    return trainer.fit(data, epochs=cfg.epochs, shuffle=False, verbose=verbose,  # tf.data shuffles
                       callbacks=list(callbacks))


def fit_ranker(frame: pd.DataFrame, labels: np.ndarray, rank: int, config: RankerConfig | None = None,
               progress: bool = True, encoder: FeatureEncoder | None = None, name: str = "ranker",
               callbacks: Sequence[Any] = (), inputs: Mapping[str, np.ndarray] | None = None) -> FitResult:
    """Train on a training frame (features, short names, ``event_timestamp``, embeddings) and
    binary ``labels`` aligned with it: listwise over each ``user_id``'s rows (the default) or
    binary cross-entropy per row (``config.loss``). ``callbacks``: Keras callbacks for ``fit``;
    ``inputs``: ``encoder.encode_frame(frame)`` when the caller has it already."""
    import keras

    cfg = config or RankerConfig()
    labels = np.asarray(labels, dtype=np.float32)
    if len(labels) != len(frame) or len(frame) == 0:
        raise ValueError(f"{len(frame)} frame rows and {len(labels)} labels: pass one label per row, at least one")
    if inputs is not None and encoder is None:
        raise ValueError("inputs were given without the encoder that made them: pass encoder= too")
    keras.utils.set_random_seed(cfg.seed)
    encoder = encoder or FeatureEncoder.fit(frame, rank, cfg.category_buckets)
    inputs = dict(inputs) if inputs is not None else encoder.encode_frame(frame)
    device, batch_size, previous = device_setup(cfg)
    try:
        model = build_model(encoder, cfg, name)
        if cfg.loss == "listwise":
            lists, targets = to_lists(inputs, labels, list_ids(frame))
            trainer, loss, examples = list_model(model), listwise_loss, (lists, targets)
            # a GPU gets more lists per step, as it gets more rows per step pointwise
            batch_size = cfg.users_per_batch * (batch_size // cfg.batch_size)
        else:
            trainer, loss, examples = model, keras.losses.BinaryCrossentropy(from_logits=True), (inputs, labels)
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=loss)
        log.info("ranker: %d rows (%d positive) on %s, %s loss, batch %d", len(labels), int(labels.sum()), device,
                 cfg.loss, batch_size)
        history = _train(trainer, examples, batch_size, cfg, progress, callbacks)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return FitResult(model, encoder, cfg, {k: [float(v) for v in vs] for k, vs in history.history.items()},
                     device, len(labels), int(labels.sum()))


def fit_ranker_cv(frame: pd.DataFrame, labels: np.ndarray, rank: int, config: RankerConfig | None = None,
                  progress: bool = True, callbacks: Sequence[Any] = ()) -> FitResult:
    """:func:`fit_ranker` on ``config.cv_folds`` folds of the label users, each scored on the
    users it did not see; the returned model is the mean of the fold models
    (:func:`average_model`) and its ``blend`` the ALS weight (among ``config.blends``) with the
    best held-out ndcg@10 over the retrieved rows. The held-out users are label users, i.e.
    training data: nothing here sees the test split. ``cv_folds`` 1 = one fit, blend 0."""
    cfg = config or RankerConfig()
    labels = np.asarray(labels, dtype=np.float32)
    if cfg.cv_folds == 1:
        return fit_ranker(frame, labels, rank, cfg, progress, callbacks=callbacks)
    encoder = FeatureEncoder.fit(frame, rank, cfg.category_buckets)  # unsupervised: shared by the folds
    # encoded once: a list's rows are all in one fold (folds split users), so a fold's rows of
    # the whole frame's encoding equal the encoding of the fold's own frame
    encoded = encoder.encode_frame(frame)
    users = frame[S.COL_USER].to_numpy()
    unique = np.unique(users)
    np.random.default_rng(cfg.seed).shuffle(unique)
    held_logits = np.zeros(len(frame), np.float32)
    members: list[Any] = []
    history: dict[str, list[float]] = {}
    for fold, held in enumerate(np.array_split(unique, cfg.cv_folds)):
        out = np.isin(users, held)
        fitted = fit_ranker(frame[~out].reset_index(drop=True), labels[~out], rank, replace(cfg, seed=cfg.seed + fold),
                            progress, encoder, name=f"ranker_fold{fold}", callbacks=callbacks,  # unique names: one bag
                            inputs={k: v[~out] for k, v in encoded.items()})
        held_inputs = {k: v[out] for k, v in encoded.items()}
        held_logits[out] = np.asarray(fitted.model.predict(held_inputs, batch_size=4096, verbose=0)).reshape(-1)
        members.append(fitted.model)
        history |= {f"fold{fold}_{k}": v for k, v in fitted.history.items()}
    # "loss": the folds' mean per epoch, as a single fit reports it
    history["loss"] = np.mean([history[f"fold{f}_loss"] for f in range(cfg.cv_folds)], axis=0).tolist()
    z = encoded["als_list"][:, 0]
    retrieved = frame[COL_RETRIEVED].to_numpy(bool) if COL_RETRIEVED in frame else np.ones(len(frame), bool)
    lists = list_ids(frame)
    trials = {float(b): list_ndcg(held_logits + b * z, labels, lists, retrieved) for b in cfg.blends}
    blend = max(trials, key=lambda b: (trials[b], -b))  # ties: the smaller ALS weight
    validation = {"blend_ndcg@10": {str(b): round(v, 5) for b, v in trials.items()},
                  "als_only_ndcg@10": round(list_ndcg(z, labels, lists, retrieved), 5), "folds": cfg.cv_folds}
    log.info("ranker: held-out ndcg@10 by ALS blend %s (ALS alone %.4f): blend %s", validation["blend_ndcg@10"],
             validation["als_only_ndcg@10"], blend)
    return FitResult(average_model(members, encoder), encoder, cfg, history, device_name(), len(labels),
                     int(labels.sum()), blend, validation)
