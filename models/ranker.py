"""The TensorFlow ranker: logits for one user against a batch of candidates.

Inputs are the online features the service reads (short Feast feature names, as
``get_training_frame`` and ``bentos.engine`` both name them), turned into tensors by one
:class:`FeatureEncoder` that training and serving share, so the two can never disagree:

- user: profile (``n_events``, ``n_events_7d``, ``mean_rating``, ``days_since_first_seen``),
  real-time (``interaction_count``, ``total_purchases``) and context (hour of day and day of week
  of the request, as sin/cos); every value has a missing-mask beside it (missing = imputed to the
  training mean, i.e. 0 after standardisation);
- item: profile (``price``, ``margin``, ``quality_score``, ``inventory``, ``popularity_1d``,
  ``popularity_7d``), whether its ``category_id`` is among the user's ``top_categories`` /
  ``preferred_categories`` (with masks), and the category itself (an embedding);
- ALS: the user and item vectors; the model computes ``user . item`` (the ALS score), both norms
  and the cosine itself (a missing vector is zeros plus a flag), and the score's place in the
  user's candidate list (:func:`list_features`). ``user * item`` per factor is optional and off:
  the ranker is trained on a label-time ALS and served with another fit, and factor axes do not
  carry over from one fit to the next;
- item statistics of the events the row's ALS is fitted on (:data:`ITEM_STATS`) and the
  candidate's cosine with the user's recent items (:data:`RECENT`), computed by the caller.

The model is a small deep-and-wide network trained listwise: softmax cross-entropy over each
user's list (its label-window positives, the retrieval candidates it will be ranked among, a few
random items), so it learns to order one user's candidates, which is all it is asked to do
(``RankerConfig.loss="pointwise"`` keeps binary cross-entropy). :func:`fit_ranker_cv` trains it
on folds of the label users, picks on the held-out users how much of the ALS score to add to the
logit (``final = blend * z_ALS + logit``) and bags the fold models. The SavedModel's
``serve`` endpoint scores ONE user against N candidates in one call (:func:`export_ranker`): it
takes the user's tensors once, the candidates' as a batch, and computes the list features and
the blend over that batch; and :func:`load_scorer` wraps it as the service's ``Scorer``.
TensorFlow is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.arrays import positions, replace_dir
from recsys import schema as S

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

SAVED_MODEL_DIR = "saved_model"
META_FILE = "ranker.json"
ITEM_STATS_FILE = "item_stats.parquet"  # ITEM_STATS per item as of the training cutoff, for serving
SERVE_ENDPOINT = "serve"
BENTO_RANKER_MODEL = "ranker"  # the name bentos/service.py pins

#: Item statistics of the events the row's ALS is fitted on (:func:`models.ranker_train.item_stats`):
#: how many events, the mean rating, the share of positive events (rating >= 4, CLICK or
#: stronger), the last two smoothed toward the overall value. ALS models *what* a user interacts
#: with; the protocol's positives are the *liked* ones, which these tell apart. Not in Feast (like
#: the ALS vectors they are tied to the split, not to a daily snapshot): missing = imputed.
ITEM_STATS: tuple[tuple[str, str], ...] = (
    ("item_events", "log1p"), ("item_mean_rating", "identity"), ("item_positive_rate", "identity"),
)
#: How close the candidate is to what the user did last: the cosine of its ALS vector with the
#: vectors of the user's ``last_5_items`` (Feast's real-time view), the best and the mean
#: (:func:`recent_similarity`). Users rate and click in sessions; ALS's user vector averages a
#: whole history and misses that (on ML-100K this is the ranker's largest gain over ALS). The
#: caller computes them with the vectors of the ALS that scores the row.
RECENT: tuple[tuple[str, str], ...] = (("recent_cosine_max", "identity"), ("recent_cosine_mean", "identity"))
#: (feature, transform) pairs; counts and prices are log1p'd before standardisation.
USER_NUMERIC: tuple[tuple[str, str], ...] = (
    ("n_events", "log1p"), ("n_events_7d", "log1p"), ("mean_rating", "identity"),
    ("days_since_first_seen", "log1p"), ("interaction_count", "log1p"), ("total_purchases", "log1p"),
)
ITEM_NUMERIC: tuple[tuple[str, str], ...] = (
    ("price", "log1p"), ("margin", "identity"), ("quality_score", "identity"), ("inventory", "log1p"),
    ("popularity_1d", "log1p"), ("popularity_7d", "log1p"),
) + ITEM_STATS + RECENT
USER_LISTS = ("top_categories", "preferred_categories")
USER_EMBEDDING, ITEM_EMBEDDING = "user_embedding", "item_embedding"
COL_RETRIEVED = "retrieved"  # training frames: whether retrieval found the row's item
#: training frames: which list (one user's candidates at one label time) a row belongs to;
#: without it a user's rows are one list
COL_LIST = "list_id"
N_CONTEXT = 4  # hour sin/cos, weekday sin/cos
#: Every online feature the ranker reads: the service must provide these (bentos.engine lists).
USER_INPUTS: tuple[str, ...] = tuple(n for n, _ in USER_NUMERIC) + USER_LISTS + (USER_EMBEDDING,)
ITEM_INPUTS: tuple[str, ...] = tuple(n for n, _ in ITEM_NUMERIC) + (S.COL_CATEGORY, ITEM_EMBEDDING)


LOSSES = ("listwise", "pointwise")


@dataclass(frozen=True)
class RankerConfig:
    """Network and training hyperparameters. On a GPU the batch is ``batch_size *
    gpu_batch_multiplier`` and the layers compute in mixed precision (float16, float32 logits)."""

    #: one layer of 64 and 8 epochs: on ML-100K's ~900 label lists a wider/deeper net or fewer
    #: epochs scored lower on the held-out label users (cross-validation, never test)
    hidden: tuple[int, ...] = (64,)
    category_buckets: int = 64
    category_dim: int = 8
    dropout: float = 0.1
    epochs: int = 8
    batch_size: int = 512
    gpu_batch_multiplier: int = 4
    learning_rate: float = 2e-3
    #: Feed ``user * item`` (per factor) to the MLP. Off by default: the ranker is trained on the
    #: label-time ALS and served with another fit, and ALS factor axes are arbitrary (any rotation
    #: fits equally well), so per-axis weights do not transfer; the dot, norms and cosine do.
    use_product: bool = False
    #: ``listwise``: softmax cross-entropy over each user's list (the positives share the target
    #: mass), batches of ``users_per_batch`` lists. The ranker only ever orders one user's
    #: candidates, so the loss compares candidates of the same user, not rows of different users
    #: (which BCE does, and which mostly teaches "this user is active"). ``pointwise``: BCE.
    loss: str = "listwise"
    users_per_batch: int = 32
    #: :func:`fit_ranker_cv`: folds over the label users and the ALS weights tried for the blend
    cv_folds: int = 5
    blends: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 1e3)
    seed: int = 42

    def __post_init__(self) -> None:
        problems = []
        if not self.hidden or min(self.hidden) < 1:
            problems.append(f"hidden={self.hidden} needs at least one layer of >= 1 unit")
        if self.category_buckets < 2 or self.category_dim < 1:
            problems.append(f"category_buckets={self.category_buckets} must be >= 2 and category_dim >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be within [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.gpu_batch_multiplier < 1:
            problems.append("epochs, batch_size and gpu_batch_multiplier must be >= 1")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r} must be one of {', '.join(LOSSES)}")
        if self.cv_folds < 1 or any(b < 0 for b in self.blends) or not self.blends:
            problems.append(f"cv_folds={self.cv_folds} must be >= 1 and blends={self.blends} non-empty, >= 0")
        if self.users_per_batch < 1:
            problems.append(f"users_per_batch={self.users_per_batch} must be >= 1")
        if problems:
            raise ValueError("invalid ranker config: " + "; ".join(problems))

    def params(self) -> dict[str, Any]:
        return {f"ranker_{k}": v for k, v in asdict(self).items()}


# ---- features -> tensors (shared by training and serving) --------------------------------------


def _floats(values: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Numbers as float64 with NaN for None/NaN/NaT (a missing column is all NaN)."""
    if values is None:
        return np.full(n, np.nan)
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0)) if kind == "log1p" else x


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _context(timestamps: Sequence[Any] | pd.Series) -> np.ndarray:
    """(n, 4): hour of day and day of week as sin/cos; missing times give zeros."""
    series = timestamps if isinstance(timestamps, pd.Series) else pd.Series(list(timestamps))
    ts = pd.to_datetime(series.reset_index(drop=True), utc=True, errors="coerce")
    hour = (ts.dt.hour + ts.dt.minute / 60.0).to_numpy(dtype=np.float64)
    day = ts.dt.dayofweek.to_numpy(dtype=np.float64)
    out = np.stack([np.sin(2 * math.pi * hour / 24), np.cos(2 * math.pi * hour / 24),
                    np.sin(2 * math.pi * day / 7), np.cos(2 * math.pi * day / 7)], axis=1)
    return np.nan_to_num(out)


def recent_similarity(item_vectors: np.ndarray, recent_ids: np.ndarray, lookup: Any,
                      chunk: int = 100_000) -> np.ndarray:
    """(n, 2) float64 :data:`RECENT` values: row i's best and mean cosine between
    ``item_vectors[i]`` (zeros = no vector) and the vectors of ``recent_ids[i]`` (its user's recent
    items, -1 = padding); NaN where either side has no vector. ``lookup(ids) -> (vectors, known)``
    gives the recent items' vectors (``Factors.item_vectors``). Chunked: memory stays bounded."""
    out = np.full((len(item_vectors), 2), np.nan)
    for start in range(0, len(item_vectors), chunk):
        items = np.asarray(item_vectors[start:start + chunk], dtype=np.float32)
        ids = np.asarray(recent_ids[start:start + chunk], dtype=np.int64)
        vectors, known = lookup(ids.reshape(-1))
        vectors = np.where(known[:, None] & (ids.reshape(-1)[:, None] >= 0), vectors, 0.0).reshape(*ids.shape, -1)
        recent = vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-6)
        item_norm = np.linalg.norm(items, axis=1)
        cosine = np.einsum("nmr,nr->nm", recent, items / (item_norm[:, None] + 1e-6))
        valid = np.linalg.norm(vectors, axis=-1) > 0
        with np.errstate(invalid="ignore"):
            best = np.where(valid, cosine, -np.inf).max(axis=1)
            mean = np.where(valid, cosine, 0.0).sum(axis=1) / valid.sum(axis=1)
        ok = valid.any(axis=1) & (item_norm > 0)
        out[start:start + chunk] = np.where(ok[:, None], np.stack([best, mean], axis=1), np.nan)
    return out


def recent_matrix(lists: Sequence[Any], width: int = 5) -> np.ndarray:
    """(n, width) int64 item ids of each row's recent-items list (-1 = padding or no list)."""
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for row, value in enumerate(lists):
        if _is_list(value) and len(value):
            ids = np.asarray(list(value)[:width], dtype=np.int64)
            out[row, : len(ids)] = ids
    return out


N_LIST = 2  # the ALS score against the user's candidate list: z-score, gap to the list's best


def list_features(dot: np.ndarray, groups: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) float32: each row's ALS score standardised within its group (one user's candidate
    list) and its gap to the group's best. Mean, std and best come from the ``reference`` rows
    (the retrieved candidates; random negatives are scored against the list, not part of it).
    A pointwise model needs this: raw ALS scores differ in scale from user to user. The serving
    endpoint computes the same over its batch (one user's candidates)."""
    dot = np.asarray(dot, dtype=np.float32)
    reference = np.ones(len(dot), bool) if reference is None else np.asarray(reference, bool)
    out = np.zeros((len(dot), N_LIST), dtype=np.float32)
    if not len(dot):
        return out
    # one pass per statistic over all groups (bincount), not one mask over all rows per group:
    # the latter is O(rows x groups), minutes for a training frame of a few thousand lists
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1
    has_reference = np.bincount(group, weights=reference, minlength=n_groups) > 0
    used = reference | ~has_reference[group]  # a group without reference rows uses all of its rows
    count = np.bincount(group, weights=used, minlength=n_groups)
    mean = np.bincount(group, weights=np.where(used, dot, 0.0), minlength=n_groups) / count
    centred = dot - mean[group]
    std = np.sqrt(np.bincount(group, weights=np.where(used, centred * centred, 0.0), minlength=n_groups) / count)
    best = np.full(n_groups, -np.inf)
    np.maximum.at(best, group[used], dot[used])
    out[:, 0] = centred / (std[group] + 1e-6)
    out[:, 1] = dot - best[group]
    return out


@dataclass
class FeatureEncoder:
    """Turns feature columns into the model's tensors. ``means``/``stds`` are fitted on the
    training frame (after log1p where it applies), so missing values impute to the mean."""

    rank: int
    category_buckets: int
    user_means: list[float] = field(default_factory=list)
    user_stds: list[float] = field(default_factory=list)
    item_means: list[float] = field(default_factory=list)
    item_stds: list[float] = field(default_factory=list)

    @property
    def user_dim(self) -> int:
        return 2 * len(USER_NUMERIC) + 1 + N_CONTEXT

    @property
    def item_dim(self) -> int:
        return 2 * len(ITEM_NUMERIC) + 2 * len(USER_LISTS) + 1

    @classmethod
    def fit(cls, frame: pd.DataFrame, rank: int, category_buckets: int) -> FeatureEncoder:
        def stats(spec: tuple[tuple[str, str], ...]) -> tuple[list[float], list[float]]:
            means, stds = [], []
            for name, kind in spec:
                x = _transform(_floats(frame[name] if name in frame else None, len(frame)), kind)
                finite = x[np.isfinite(x)]
                means.append(float(finite.mean()) if finite.size else 0.0)
                std = float(finite.std()) if finite.size else 0.0
                stds.append(std if std > 1e-9 else 1.0)
            return means, stds

        user_means, user_stds = stats(USER_NUMERIC)
        item_means, item_stds = stats(ITEM_NUMERIC)
        return cls(rank, category_buckets, user_means, user_stds, item_means, item_stds)

    def _numeric(self, cols: Mapping[str, Any], spec: tuple[tuple[str, str], ...], means: list[float],
                 stds: list[float], n: int) -> np.ndarray:
        values, masks = [], []
        for (name, kind), mean, std in zip(spec, means, stds):
            x = _transform(_floats(cols.get(name), n), kind)
            missing = ~np.isfinite(x)
            values.append(np.where(missing, 0.0, (x - mean) / std))
            masks.append(missing.astype(np.float64))
        return np.stack(values + masks, axis=1)

    def user_matrix(self, cols: Mapping[str, Any], timestamps: Sequence[Any] | pd.Series, n: int) -> np.ndarray:
        """(n, user_dim): standardised values, their masks, has-ALS-vector, context."""
        has_vector = np.array([_is_list(v) and len(v) == self.rank for v in _column(cols, USER_EMBEDDING, n)])
        return np.concatenate([self._numeric(cols, USER_NUMERIC, self.user_means, self.user_stds, n),
                               has_vector[:, None].astype(np.float64), _context(timestamps)], axis=1).astype(np.float32)

    def item_matrix(self, cols: Mapping[str, Any], user_lists: Mapping[str, Sequence[Any]], n: int) -> np.ndarray:
        """(n, item_dim): standardised values, masks, category matches with the user's lists
        (row i against ``user_lists[name][i]``) and their masks, has-ALS-vector."""
        category = _floats(cols.get(S.COL_CATEGORY), n)
        matches, masks = [], []
        for name in USER_LISTS:
            lists = user_lists.get(name) or [None] * n
            known = np.array([_is_list(v) and len(v) > 0 for v in lists]) & np.isfinite(category)
            hit = np.array([bool(k) and int(c) in {int(x) for x in v} for k, c, v in zip(known, category, lists)])
            matches.append(hit.astype(np.float64))
            masks.append((~known).astype(np.float64))
        has_vector = np.array([_is_list(v) and len(v) == self.rank for v in _column(cols, ITEM_EMBEDDING, n)])
        return np.concatenate([self._numeric(cols, ITEM_NUMERIC, self.item_means, self.item_stds, n),
                               np.stack(matches + masks, axis=1), has_vector[:, None].astype(np.float64)],
                              axis=1).astype(np.float32)

    def categories(self, cols: Mapping[str, Any], n: int) -> np.ndarray:
        """(n,) int32 bucket of ``category_id``: 1 + id mod (buckets - 1); 0 = missing."""
        category = _floats(cols.get(S.COL_CATEGORY), n)
        known = np.isfinite(category)
        out = np.zeros(n, dtype=np.int32)
        out[known] = 1 + np.mod(category[known].astype(np.int64), self.category_buckets - 1)
        return out

    def embeddings(self, values: Sequence[Any], n: int) -> np.ndarray:
        """(n, rank) float32; a missing vector (or one of the wrong size) is all zeros."""
        out = np.zeros((n, self.rank), dtype=np.float32)
        values = list(values)
        rows = [row for row, value in enumerate(values) if _is_list(value) and len(value) == self.rank]
        if rows:  # one C-level stack, not a row-by-row copy
            out[rows] = np.stack([np.asarray(values[row], dtype=np.float32) for row in rows])
        return out

    def encode_frame(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """One training row per frame row: the model's inputs (row-aligned with ``frame``)."""
        n = len(frame)
        cols = {c: frame[c].tolist() for c in frame.columns}
        lists = {name: cols.get(name) or [None] * n for name in USER_LISTS}
        user_vec = self.embeddings(_column(cols, USER_EMBEDDING, n), n)
        item_vec = self.embeddings(_column(cols, ITEM_EMBEDDING, n), n)
        reference = frame[COL_RETRIEVED].to_numpy(bool) if COL_RETRIEVED in frame else None
        return {
            "als_list": list_features((user_vec * item_vec).sum(axis=1), list_ids(frame), reference),
            "user": self.user_matrix(cols, frame[S.COL_TS], n),
            "item": self.item_matrix(cols, lists, n),
            "item_category": self.categories(cols, n),
            "user_embedding": user_vec,
            "item_embedding": item_vec,
        }


def list_ids(frame: pd.DataFrame) -> np.ndarray:
    """Each row's list: :data:`COL_LIST` where the frame has it, else its user."""
    return frame[COL_LIST if COL_LIST in frame else S.COL_USER].to_numpy()


def _column(cols: Mapping[str, Any], name: str, n: int) -> Sequence[Any]:
    values = cols.get(name)
    return [None] * n if values is None else values


# ---- the network --------------------------------------------------------------------------------


def build_model(encoder: FeatureEncoder, config: RankerConfig, name: str = "ranker") -> keras.Model:
    """The ranker network. Shapes, for a batch of B (user, item) rows and ALS rank R:

    - ``user``: float32 (B, encoder.user_dim); ``item``: float32 (B, encoder.item_dim);
    - ``item_category``: int32 (B,); ``user_embedding``, ``item_embedding``: float32 (B, R);
    - ``als_list``: float32 (B, 2), :func:`list_features` of the row's ALS score in its list;
    - output: float32 (B,) logits (row i scores user row i against item row i).

    deep: MLP over [user, item, category embedding, ALS stats, ``als_list`` (and user * item
    when ``config.use_product``)], where the ALS stats are user . item (the ALS score), both
    norms and the cosine; wide: linear over [ALS stats, ``als_list``, item], so the ALS score
    reaches the logit directly.
    """
    import keras
    from keras import layers, ops

    inputs = model_inputs(encoder)
    user, item, category = inputs["user"], inputs["item"], inputs["item_category"]
    user_vec, item_vec, als_list = inputs["user_embedding"], inputs["item_embedding"], inputs["als_list"]

    def als_stats(vectors: list[Any]) -> Any:
        """(B, 4): user . item (the ALS score), |user|, |item| and their cosine."""
        u, i = vectors
        dot = ops.sum(u * i, axis=-1, keepdims=True)
        u_norm = ops.sqrt(ops.sum(u * u, axis=-1, keepdims=True))
        i_norm = ops.sqrt(ops.sum(i * i, axis=-1, keepdims=True))
        return ops.concatenate([dot, u_norm, i_norm, dot / (u_norm * i_norm + 1e-6)], axis=-1)

    product = layers.Multiply(name="als_product")([user_vec, item_vec])
    dot = layers.Lambda(als_stats, name="als_score")([user_vec, item_vec])
    cat = layers.Flatten()(layers.Embedding(config.category_buckets, config.category_dim, name="category")(
        layers.Reshape((1,))(category)))
    x = layers.Concatenate()([user, item, cat, *([product] if config.use_product else []), dot, als_list])
    for units in config.hidden:
        x = layers.Dense(units, activation="relu")(x)
        if config.dropout:
            x = layers.Dropout(config.dropout, seed=config.seed)(x)
    deep = layers.Dense(1, name="deep")(x)
    wide = layers.Dense(1, name="wide")(layers.Concatenate()([dot, als_list, item]))
    logit = layers.Add()([deep, wide])
    # float32 logits even under mixed precision: a float16 sigmoid/BCE loses precision
    out = layers.Activation("linear", dtype="float32", name="logit")(layers.Reshape(())(logit))
    return keras.Model(inputs, out, name=name)


def model_inputs(encoder: FeatureEncoder) -> dict[str, Any]:
    """The network's Keras inputs by name (shapes in :func:`build_model`)."""
    import keras

    return {"user": keras.Input((encoder.user_dim,), name="user"),
            "item": keras.Input((encoder.item_dim,), name="item"),
            "item_category": keras.Input((), dtype="int32", name="item_category"),
            "user_embedding": keras.Input((encoder.rank,), name="user_embedding"),
            "item_embedding": keras.Input((encoder.rank,), name="item_embedding"),
            "als_list": keras.Input((N_LIST,), name="als_list")}


def average_model(members: Sequence[keras.Model], encoder: FeatureEncoder) -> keras.Model:
    """One model whose logit is the mean of ``members``' logits (same encoder): the
    cross-validation folds' models, bagged. On a few hundred training lists one fit is noisy;
    the mean of the fold models is steadier than any of them and costs no extra fit."""
    import keras
    from keras import layers

    if len(members) == 1:
        return members[0]
    inputs = model_inputs(encoder)
    out = layers.Average(dtype="float32", name="logit_mean")([m(inputs) for m in members])
    return keras.Model(inputs, out, name="ranker_bag")


@dataclass
class FitResult:
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


def gpu_visible() -> bool:
    """Whether the active Keras backend sees a GPU. TensorFlow is the production backend (the
    export is a SavedModel); the network and its training loop run on any Keras 3 backend, which
    is how the GPU path is checked on a machine that has JAX or PyTorch but no TensorFlow build."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def _device_setup_name() -> str:
    return "GPU" if gpu_visible() else "CPU"


def _device_setup(config: RankerConfig) -> tuple[str, int, str]:
    """(device, batch size, previous Keras dtype policy): a visible GPU gets mixed precision and
    a larger batch; the CPU runs the same code in float32."""
    import keras

    previous = keras.mixed_precision.dtype_policy().name
    if gpu_visible():
        keras.mixed_precision.set_global_policy("mixed_float16")
        return "GPU", config.batch_size * config.gpu_batch_multiplier, previous
    return "CPU", config.batch_size, previous


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
    device, batch_size, previous = _device_setup(cfg)
    try:
        model = build_model(encoder, cfg, name)
        if cfg.loss == "listwise":
            lists, targets = to_lists(inputs, labels, list_ids(frame))
            trainer, loss, examples = _ListModel(model), listwise_loss, (lists, targets)
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
    return FitResult(average_model(members, encoder), encoder, cfg, history, _device_setup_name(), len(labels),
                     int(labels.sum()), blend, validation)


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


def _ListModel(model: keras.Model) -> keras.Model:
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


# ---- SavedModel ---------------------------------------------------------------------------------


def export_ranker(result: FitResult, folder: Path, metadata: Mapping[str, Any] | None = None,
                  item_stats: pd.DataFrame | None = None) -> Path:
    """Write ``folder/saved_model`` (endpoint ``serve``: one user against N candidates),
    ``folder/ranker.json`` (the encoder, config and ``metadata``) and, when given,
    ``folder/item_stats.parquet`` (:data:`ITEM_STATS` by item id, which the service has no other
    source for). Replaces ``folder`` whole."""
    import keras
    import tensorflow as tf

    enc, model = result.encoder, result.model

    def write(tmp: Path) -> None:
        archive = keras.export.ExportArchive()
        archive.track(model)

        def serve(user: Any, items: Any, item_category: Any, user_embedding: Any, item_embedding: Any) -> Any:
            n = tf.shape(items)[0]
            # the batch is one user's candidate list: the same list features as in training
            dot = tf.linalg.matvec(item_embedding, user_embedding)
            z = (dot - tf.reduce_mean(dot)) / (tf.math.reduce_std(dot) + 1e-6)
            als_list = tf.stack([z, dot - tf.reduce_max(dot)], axis=1)
            logits = model({"user": tf.tile(user[None, :], [n, 1]), "item": items, "item_category": item_category,
                            "user_embedding": tf.tile(user_embedding[None, :], [n, 1]),
                            "item_embedding": item_embedding, "als_list": als_list}, training=False)
            # the blend chosen on held-out label users: the ALS ranking plus the learned correction
            return tf.cast(tf.reshape(logits, [-1]), tf.float32) + tf.constant(result.blend, tf.float32) * z

        archive.add_endpoint(SERVE_ENDPOINT, serve, input_signature=[
            tf.TensorSpec([enc.user_dim], tf.float32, name="user"),
            tf.TensorSpec([None, enc.item_dim], tf.float32, name="items"),
            tf.TensorSpec([None], tf.int32, name="item_category"),
            tf.TensorSpec([enc.rank], tf.float32, name="user_embedding"),
            tf.TensorSpec([None, enc.rank], tf.float32, name="item_embedding"),
        ])
        archive.write_out(str(tmp / SAVED_MODEL_DIR), verbose=False)
        meta = {"encoder": asdict(enc), "config": asdict(result.config), "device": result.device,
                "rows": result.rows, "positives": result.positives, "history": result.history,
                "blend": result.blend, "validation": result.validation,
                "created": datetime.now(timezone.utc).isoformat(), **dict(metadata or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if item_stats is not None:
            item_stats[[name for name, _ in ITEM_STATS]].to_parquet(tmp / ITEM_STATS_FILE)

    return replace_dir(Path(folder), write)


class RankerScorer:
    """The exported ranker as the service's ``Scorer`` (bentos.engine): logits for one user
    (``user``: feature name -> value) against N candidates (``items``: feature name -> N values)."""

    def __init__(self, folder: Path) -> None:
        import tensorflow as tf

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        self.encoder = FeatureEncoder(**meta["encoder"])
        self.version = str(meta.get("version") or meta.get("mlflow_run_id") or meta.get("created", "unknown"))
        self.metadata = meta
        self._model = tf.saved_model.load(str(folder / SAVED_MODEL_DIR))
        self._serve = getattr(self._model, SERVE_ENDPOINT)
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
            "item_embedding": enc.embeddings(_column(items, ITEM_EMBEDDING, n), n),
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

    def score_frame(self, frame: pd.DataFrame, progress: bool = False) -> np.ndarray:
        """(len(frame),) float64 logits for candidate rows (``user_id``, ``item_id``, feature
        columns named as in :func:`pipelines.feature_store.get_training_frame`, optionally
        ``event_timestamp`` for the context), row-aligned. Each user's rows are scored together
        as one candidate list (the list features depend on the list), with the user's features
        taken from their first row."""
        out = np.empty(len(frame), dtype=np.float64)
        if not len(frame):
            return out
        from tqdm.auto import tqdm

        user_cols = [c for c in USER_INPUTS if c in frame.columns]
        groups = frame.groupby(S.COL_USER, sort=False).indices
        for rows in tqdm(groups.values(), total=len(groups), desc="score", unit="user", disable=not progress):
            group = frame.iloc[rows]
            first = group.iloc[0]
            when = first[S.COL_TS] if S.COL_TS in group.columns else None
            out[rows] = self.score({c: first[c] for c in user_cols}, {c: group[c].tolist() for c in group.columns},
                                   group[S.COL_ITEM].to_numpy(np.int64), np.zeros(len(rows)), {"timestamp": when})
        return out


def load_scorer(path: Path) -> RankerScorer:
    """The ranker saved by :func:`export_ranker` (a BentoML model's path works as is)."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / SAVED_MODEL_DIR).is_dir():
        raise FileNotFoundError(f"no ranker at {path}: expected {META_FILE} and {SAVED_MODEL_DIR}/ "
                                "(train one with `recsys train ranker`)")
    return RankerScorer(path)


# ---- a tiny ranker for tests on a clean machine --------------------------------------------------


def tiny_frame(n_users: int = 12, n_items: int = 20, rank: int = 8, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A hand-made training frame: every user likes the items of category ``user % 3``; the ALS
    vectors agree (one-hot of the category), and a third of the item vectors are missing."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for user in range(1, n_users + 1):
        user_vec = np.zeros(rank, np.float32)
        user_vec[user % 3] = 1.0
        for item in range(1, n_items + 1):
            item_vec = np.zeros(rank, np.float32)
            item_vec[item % 3] = 1.0
            rows.append({S.COL_USER: user, S.COL_ITEM: item, S.COL_TS: pd.Timestamp("2026-01-01 12:00", tz="UTC"),
                         "n_events": float(user * 3), "interaction_count": None if user % 4 == 0 else user,
                         "top_categories": [user % 3], S.COL_CATEGORY: item % 3, "price": float(item),
                         "popularity_7d": int(rng.integers(0, 10)), USER_EMBEDDING: user_vec,
                         ITEM_EMBEDDING: None if item % 3 == 0 and item % 2 else item_vec})
            labels.append(float(item % 3 == user % 3))
    return pd.DataFrame(rows), np.asarray(labels, dtype=np.float32)


def train_tiny_ranker(folder: Path, rank: int = 8, epochs: int = 20) -> Path:
    """Train and export a tiny ranker on :func:`tiny_frame` (a few seconds on CPU): what the
    service's tests load with :func:`load_scorer` on a clean machine. Returns ``folder``."""
    frame, labels = tiny_frame(rank=rank)
    result = fit_ranker(frame, labels, rank, RankerConfig(hidden=(16,), epochs=epochs, batch_size=32, learning_rate=1e-2,
                                                          category_buckets=8, dropout=0.0), progress=False)
    # item statistics for the service's path (hand-checkable: item_events = the item's id)
    ids = np.unique(frame[S.COL_ITEM].to_numpy(np.int64))
    stats = pd.DataFrame({"item_events": ids.astype(np.float64), "item_mean_rating": 3.5, "item_positive_rate": 0.5},
                         index=pd.Index(ids, name=S.COL_ITEM))
    return export_ranker(result, Path(folder), {"version": "tiny"}, item_stats=stats)

