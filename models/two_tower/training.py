"""Training the two towers (:func:`train_two_tower` -> :class:`TrainedTwoTower`): either loss, or
both with ``loss="auto"`` keeping the one with the higher validation recall; early stopping on
validation recall with the best epoch restored, the best weights checkpointed and TensorBoard
logs under the work folder. On the device :func:`device_setup` picks (a visible GPU: mixed
precision, a larger batch; else the CPU in float32, the same code).

A training frame has one row per positive (user, item) interaction: the user columns as of the
row's time, the item columns, ``event_timestamp``. The trainer is a Keras ``Model`` subclass that
overrides ``compute_loss`` only (Keras' own ``train_step`` does the gradients): the softmax loss
scores each row's user against every item of the batch (:mod:`models.two_tower.losses`); the BCE
loss scores it against its item and ``n_negatives`` catalogue items drawn uniformly in the step
(aged at the row's time, as the encoder ages the positive). Keras is imported inside functions:
importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.ranker.device import gpu_visible
from models.two_tower.config import TRAINED_LOSSES, TwoTowerConfig
from models.two_tower.evaluation import ValidationSet, build_validation, validation_auc, validation_recall
from models.two_tower.features import (
    ITEM_COLUMNS,
    ITEM_TENSORS,
    MISSING,
    USER_COLUMNS,
    USER_TENSORS,
    TwoTowerEncoder,
    catalogue_frame,
    epoch_days,
    require_columns,
)
from models.two_tower.losses import bce_loss, sampling_log_q, softmax_loss
from models.two_tower.network import build_towers, run_tower
from recsys import schema as S

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainedTwoTower:
    """Two trained towers with the encoder that feeds them. ``metrics``: the kept loss's
    validation ``recall@k``, ``auc`` and ``best_epoch``; ``trials``: the same per trained loss
    (both with ``auto``); ``history``: the kept fit's per-epoch logs."""

    user_tower: Any  # keras.Model
    item_tower: Any  # keras.Model
    encoder: TwoTowerEncoder
    config: TwoTowerConfig
    loss: str
    metrics: dict[str, float]
    trials: dict[str, dict[str, float]] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    device: str = "CPU"
    rows: int = 0

    def user_vectors(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 (n, output_dim), unit rows: one per row of ``frame`` (the user columns)."""
        return self._user(self.encoder.encode_users(frame))

    def item_vectors(self, frame: pd.DataFrame, as_of: datetime | pd.Timestamp | None = None) -> np.ndarray:
        """float32 (n, output_dim), unit rows: one per row of ``frame`` (the item columns), aged
        at ``as_of``, else at each row's ``event_timestamp``, else now."""
        return self._item(self.encoder.encode_items(frame, as_of))

    def _user(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return run_tower(lambda x: self.user_tower(x, training=False), inputs, self.config.output_dim)

    def _item(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return run_tower(lambda x: self.item_tower(x, training=False), inputs, self.config.output_dim)


def device_setup(config: TwoTowerConfig) -> tuple[str, int, str]:
    """(device, batch size, previous Keras dtype policy), as models.ranker.device does it: a
    visible GPU gets mixed precision and ``gpu_batch_multiplier`` times the batch (more in-batch
    negatives too); the CPU runs the same code in float32."""
    import keras

    previous = keras.mixed_precision.dtype_policy().name
    if gpu_visible():
        keras.mixed_precision.set_global_policy("mixed_float16")
        return "GPU", config.batch_size * config.gpu_batch_multiplier, previous
    return "CPU", config.batch_size, previous


def train_two_tower(train_frame: pd.DataFrame, valid_frame: pd.DataFrame, config: TwoTowerConfig | None,
                    workdir: Path, progress: bool = False) -> TrainedTwoTower:
    """Fit the encoder on ``train_frame`` and train the towers with ``config.loss`` (with
    ``auto``: each of :data:`TRAINED_LOSSES` from the same initial weights, keeping the higher
    validation recall@``select_k``; ties keep the first). ``valid_frame`` (later rows than
    training, never the test split) drives early stopping and the metrics. Writes
    ``workdir/tensorboard/<loss>`` and ``workdir/checkpoints/<loss>.weights.h5``."""
    cfg = config or TwoTowerConfig()
    for role, frame in (("training", train_frame), ("validation", valid_frame)):
        require_columns(frame, (*USER_COLUMNS, *ITEM_COLUMNS, S.COL_TS), role)
        if frame.empty:
            raise ValueError(f"the {role} frame has no rows: pass at least one positive interaction")
    workdir = Path(workdir)
    encoder = TwoTowerEncoder.fit(train_frame, cfg)
    validation = build_validation(train_frame, valid_frame, encoder, cfg.auc_negatives, cfg.seed)
    train_inputs = _training_inputs(encoder, train_frame, train_frame)
    valid_inputs = _training_inputs(encoder, valid_frame, train_frame)
    catalogue = _catalogue_inputs(encoder, catalogue_frame(train_frame))
    fits = [_fit_one(encoder, cfg, loss, train_inputs, valid_inputs, catalogue, validation, workdir, progress)
            for loss in (TRAINED_LOSSES if cfg.loss == "auto" else (cfg.loss,))]
    key = f"recall@{cfg.select_k}"
    best = max(fits, key=lambda f: (np.nan_to_num(f.metrics[key], nan=-1.0), -fits.index(f)))
    best.trials = {f.loss: f.metrics for f in fits}
    if len(fits) > 1:
        log.info("two-tower: %s by loss %s: keeping %s", key, {f.loss: round(f.metrics[key], 4) for f in fits},
                 best.loss)
    return best


def _training_inputs(encoder: TwoTowerEncoder, frame: pd.DataFrame, train: pd.DataFrame) -> dict[str, np.ndarray]:
    """The towers' tensors of ``frame`` plus what the losses need: ``log_q`` (the row's item's
    in-batch sampling probability, from ``train``'s frequencies) and ``row_day`` (the row's time,
    which ages the sampled negatives)."""
    return {**encoder.encode(frame),
            "log_q": sampling_log_q(train[S.COL_ITEM].to_numpy(np.int64), frame[S.COL_ITEM].to_numpy(np.int64)),
            "row_day": epoch_days(frame[S.COL_TS]).astype(np.float32)}


def _catalogue_inputs(encoder: TwoTowerEncoder, items: pd.DataFrame) -> dict[str, np.ndarray]:
    """The training items' time-free tensors (the negatives drawn from) and ``created_day``."""
    inputs = encoder.encode_items(items, as_of=pd.Timestamp(0, tz="UTC"))
    del inputs["item_age_days"]  # aged per row, in the step
    return {**inputs, "created_day": epoch_days(items[S.COL_CREATED_AT]).astype(np.float32)}


def _fit_one(encoder: TwoTowerEncoder, cfg: TwoTowerConfig, loss: str, train_inputs: Mapping[str, np.ndarray],
             valid_inputs: Mapping[str, np.ndarray], catalogue: Mapping[str, np.ndarray],
             validation: ValidationSet, workdir: Path, progress: bool) -> TrainedTwoTower:
    """One loss: towers from ``cfg.seed``, fit with early stopping on validation recall."""
    import keras

    keras.utils.set_random_seed(cfg.seed)  # the same initial towers for every loss compared
    device, batch_size, previous = device_setup(cfg)
    try:
        user_tower, item_tower = build_towers(encoder, cfg)
        trainer = _trainer(user_tower, item_tower, catalogue, replace(cfg, loss=loss))
        optimizer = keras.optimizers.Adam(cfg.learning_rate)
        if device == "GPU":
            # float16 gradients underflow without loss scaling; Keras adds it itself only to a model
            # whose own policy is mixed, and the trainer's is float32 (see _trainer)
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # XLA pays seconds of compilation per traced step: on a CPU, for towers this small, more
        # than it saves
        trainer.compile(optimizer=optimizer, jit_compile=device == "GPU")
        fitted = TrainedTwoTower(user_tower, item_tower, encoder, cfg, loss, {}, device=device,
                                 rows=len(train_inputs["log_q"]))
        monitor = f"val_recall_at_{cfg.select_k}"
        (workdir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        callbacks = [
            _recall_callback(fitted, validation),  # first: the callbacks after it read its numbers
            keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=cfg.patience,
                                          restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(str(workdir / CHECKPOINT_DIR / f"{loss}.weights.h5"), monitor=monitor,
                                            mode="max", save_best_only=True, save_weights_only=True),
            _tensorboard_callback(workdir / TENSORBOARD_DIR / loss),
        ]
        log.info("two-tower: %d rows on %s, %s loss, batch %d", fitted.rows, device, loss, batch_size)
        history = trainer.fit(dict(train_inputs), batch_size=batch_size, epochs=cfg.epochs, shuffle=True,
                              validation_data=(dict(valid_inputs),), callbacks=callbacks, verbose=int(progress))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    fitted.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    scores = fitted.history[monitor]
    fitted.metrics = {**validation_recall(validation, fitted._user, fitted._item, cfg.recall_ks),
                      "auc": validation_auc(validation, fitted._user, fitted._item),
                      "best_epoch": float(int(np.argmax(scores)) + 1), "epochs": float(len(scores))}
    log.info("two-tower %s: validation %s", loss, {k: round(v, 4) for k, v in fitted.metrics.items()})
    return fitted


def _recall_callback(fitted: TrainedTwoTower, validation: ValidationSet) -> Any:
    """A callback that adds ``val_recall_at_<k>`` to each epoch's logs (for early stopping, the
    checkpoint, TensorBoard and the history)."""
    import keras

    class ValidationRecall(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            recall = validation_recall(validation, fitted._user, fitted._item, fitted.config.recall_ks)
            if logs is not None:
                logs.update({f"val_{k.replace('@', '_at_')}": v for k, v in recall.items()})

    return ValidationRecall()


def _tensorboard_callback(log_dir: Path) -> Any:
    """A callback that writes each epoch's logs as TensorBoard scalars, laid out as Keras'
    ``TensorBoard`` callback does (``train/`` and ``validation/``, tags ``epoch_<name>``). Not that
    callback itself: it needs the ``tensorboard`` package, which TensorFlow 2.21 no longer
    installs; ``tf.summary.write`` with the scalar plugin's metadata is in TensorFlow's core."""
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    scalar = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                                         data_class=summary_pb2.DATA_CLASS_SCALAR)

    class EpochScalars(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.writers = {split: tf.summary.create_file_writer(str(log_dir / split))
                            for split in ("train", "validation")}

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            for name, value in (logs or {}).items():
                split, tag = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
                with self.writers[split].as_default():
                    tf.summary.write(f"epoch_{tag}", tf.constant(float(value), tf.float32), step=epoch,
                                     metadata=scalar)

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            for writer in self.writers.values():
                writer.close()

    return EpochScalars()


def _trainer(user_tower: Any, item_tower: Any, catalogue: Mapping[str, np.ndarray], cfg: TwoTowerConfig) -> Any:
    """The training model of ``cfg.loss`` (``bce`` or ``softmax``) over the two towers. Its
    ``call`` returns the batch's vectors: ``user`` (B, D), ``item`` (B, D) and, for BCE,
    ``negatives`` (B, K, D) with their ``negative_hash`` (B, K); ``compute_loss`` the loss."""
    import keras
    from keras import ops

    k, temperature, n_items = cfg.n_negatives, cfg.temperature, len(catalogue["item_hash"])

    class TwoTowerTrainer(keras.Model):
        def __init__(self) -> None:
            # float32: a mixed-precision model casts its float inputs to float16, which would round
            # row_day (~20,000 days since 1970) to 16 days; the towers keep their own policy
            super().__init__(name=f"two_tower_{cfg.loss}", dtype="float32")
            self.user_tower, self.item_tower = user_tower, item_tower
            self.catalogue = {name: ops.convert_to_tensor(v) for name, v in catalogue.items()}
            self.seeds = keras.random.SeedGenerator(cfg.seed)

        def call(self, x: dict[str, Any], training: bool = False) -> dict[str, Any]:
            out = {"user": self.user_tower({n: x[n] for n in USER_TENSORS}, training=training),
                   "item": self.item_tower({n: x[n] for n in ITEM_TENSORS}, training=training)}
            if cfg.loss == "bce":
                batch = ops.shape(x["row_day"])[0]
                index = ops.reshape(keras.random.randint((batch, k), 0, n_items, seed=self.seeds), (-1,))
                negatives = {n: ops.take(self.catalogue[n], index, axis=0) for n in ITEM_TENSORS if n in self.catalogue}
                created = ops.take(self.catalogue["created_day"], index, axis=0)
                row_day = ops.reshape(ops.repeat(ops.expand_dims(x["row_day"], 1), k, axis=1), (-1,))
                # the encoder's age_days, in the step: at least 0 days, MISSING when a time is unknown
                known = ops.logical_and(ops.isfinite(created), ops.isfinite(row_day))
                age = ops.maximum(ops.where(known, row_day - created, 0.0), 0.0)
                negatives["item_age_days"] = ops.where(known, age, MISSING)
                vectors = self.item_tower(negatives, training=training)
                out["negatives"] = ops.reshape(vectors, (-1, k, cfg.output_dim))
                out["negative_hash"] = ops.reshape(negatives["item_hash"], (-1, k))
            return out

        def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                         training: bool = True) -> Any:
            if cfg.loss == "softmax":
                return softmax_loss(y_pred["user"], y_pred["item"], x["log_q"], temperature, x["item_hash"])
            own = ops.equal(y_pred["negative_hash"], ops.expand_dims(x["item_hash"], 1))
            return bce_loss(y_pred["user"], y_pred["item"], y_pred["negatives"], temperature,
                            ops.logical_not(own))

    return TwoTowerTrainer()
