"""Columns -> tensors for both towers, one implementation for training and serving: the input
schema (:data:`USER_COLUMNS`, :data:`ITEM_COLUMNS`), the tensors' names (:data:`USER_TENSORS`,
:data:`ITEM_TENSORS`) and :class:`TwoTowerEncoder`, fitted on training rows only and saved as
JSON plus the title vocabulary so serving rebuilds it identically.

The columns are the online features' short names (Feast's ``user_profile``, ``user_realtime`` and
``item_profile`` views, as ``bentos.features`` and the point-in-time training frames name them):

- user: ``user_id``; the profile aggregates (counts log1p'd, then standardised, each with a
  missing-mask); ``last_5_items`` (item ids, -1 = padding), which the user tower averages through
  the item tower's id table; ``top_categories`` and ``preferred_categories`` (category ids);
- item: ``item_id``, ``category_id``, ``tags`` (a list of strings, as the catalogue stores them,
  or one ``|``-joined string), ``title`` (tokens of a TextVectorization), ``price`` and
  ``created_at``, whose age at the row's time (``event_timestamp``) is bucketed by the tower.

Every column must exist (a frame without one is refused with its name); values may be null, and
a null is masked, never guessed. Keras is imported inside functions: importing this is cheap.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.columns import floats, is_list, transform
from models.two_tower.config import TwoTowerConfig
from recsys import schema as S

#: (column, transform): counts and ages are log1p'd before standardisation
USER_NUMERIC: tuple[tuple[str, str], ...] = (
    ("n_events", "log1p"), ("n_events_7d", "log1p"), ("mean_rating", "identity"),
    ("days_since_first_seen", "log1p"), ("interaction_count", "log1p"), ("total_purchases", "log1p"),
)
COL_RECENT = "last_5_items"
RECENT_WIDTH = 5  # the length of the online feature ``last_5_items``
CATEGORY_LISTS = ("top_categories", "preferred_categories")
COL_TAGS, COL_TITLE, COL_PRICE = "tags", "title", "price"
#: what each tower reads; a frame for the user tower needs every user column, and so on
USER_COLUMNS: tuple[str, ...] = (S.COL_USER, *(n for n, _ in USER_NUMERIC), COL_RECENT, *CATEGORY_LISTS)
ITEM_COLUMNS: tuple[str, ...] = (S.COL_ITEM, S.COL_CATEGORY, COL_TAGS, COL_TITLE, COL_PRICE, S.COL_CREATED_AT)
#: the towers' input tensors by name (shapes in models.two_tower.network.build_towers)
USER_TENSORS = ("user_hash", "user_numeric", "user_recent_items", "user_top_categories", "user_preferred_categories")
ITEM_TENSORS = ("item_hash", "item_category", "item_tags", "item_title", "item_price", "item_age_days")
MISSING = -1.0  # price and age when unknown: the tower's bucket 0
VOCABULARY_FILE = "title_vocabulary.txt"
ENCODER_FILE = "encoder.json"
_DAY_S = 86_400.0


def require_columns(frame: pd.DataFrame, columns: Sequence[str], role: str) -> None:
    """Raise a ValueError naming the first of ``columns`` that ``frame`` lacks, and the fix."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"the {role} frame has no column {missing[0]!r} (missing: {missing}): add it, with nulls where "
            f"the value is unknown (nulls are masked); the {role} needs {list(columns)}")




def hash_ids(values: Sequence[Any], buckets: int) -> np.ndarray:
    """(n,) int32: ``1 + id mod (buckets - 1)``; 0 for a missing or negative id (-1 pads lists)."""
    ids = floats(values)
    known = np.isfinite(ids) & (ids >= 0)
    out = np.zeros(len(ids), dtype=np.int32)
    out[known] = 1 + np.mod(ids[known].astype(np.int64), buckets - 1)
    return out




def id_lists(values: Sequence[Any], width: int, buckets: int) -> np.ndarray:
    """(n, width) int32 hashed ids of each row's list (first ``width``), 0 = padding or none."""
    out = np.zeros((len(values), width), dtype=np.int32)
    for row, value in enumerate(values):
        if is_list(value) and len(value):
            head = list(value)[:width]
            out[row, : len(head)] = hash_ids(head, buckets)
    return out


def tag_list(value: Any) -> list[str]:
    """A row's tags: a list/array of strings or one ``|``-joined string; None/NaN = none."""
    if isinstance(value, str):
        return [t.strip() for t in value.split("|") if t.strip()]
    if is_list(value):
        return [str(t) for t in value if t is not None and str(t)]
    return []


def hash_tags(values: Sequence[Any], width: int, buckets: int) -> np.ndarray:
    """(n, width) int32: ``1 + crc32(tag) mod (buckets - 1)`` per tag (crc32, not ``hash``: the
    latter is salted per process, and serving must hash as training did); 0 = padding."""
    out = np.zeros((len(values), width), dtype=np.int32)
    for row, value in enumerate(values):
        for col, tag in enumerate(tag_list(value)[:width]):
            out[row, col] = 1 + zlib.crc32(tag.encode("utf-8")) % (buckets - 1)
    return out


def epoch_days(values: Sequence[Any] | pd.Series) -> np.ndarray:
    """(n,) float64 days since 1970-01-01 UTC (a naive time is read as UTC); NaN when missing."""
    series = values.reset_index(drop=True) if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    ts = pd.to_datetime(series, utc=True, errors="coerce")
    return (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64) / _DAY_S


def age_days(row_days: np.ndarray, created_days: np.ndarray) -> np.ndarray:
    """(n,) float32 item age in days at the row's time, at least 0 (an item listed after the row
    is new, not negative-aged); :data:`MISSING` where either time is unknown. The training model
    computes the same for its sampled negatives (models.two_tower.training)."""
    known = np.isfinite(row_days) & np.isfinite(created_days)
    age = np.maximum(np.where(known, row_days - created_days, 0.0), 0.0)
    return np.where(known, age, MISSING).astype(np.float32)


def prices(values: Sequence[Any]) -> np.ndarray:
    """(n,) float32 price, :data:`MISSING` when null or negative."""
    x = floats(values)
    return np.where(np.isfinite(x) & (x >= 0), x, MISSING).astype(np.float32)


def catalogue_frame(*frames: pd.DataFrame) -> pd.DataFrame:
    """One row per item (its latest row by ``event_timestamp`` across ``frames``): the item
    columns, sorted by item id, index 0..n-1."""
    rows = pd.concat([f[[*ITEM_COLUMNS, *([S.COL_TS] if S.COL_TS in f else [])]] for f in frames], ignore_index=True)
    if S.COL_TS in rows:
        rows = rows.sort_values(S.COL_TS, kind="stable")
    return (rows.drop_duplicates(S.COL_ITEM, keep="last")[list(ITEM_COLUMNS)]
            .sort_values(S.COL_ITEM).reset_index(drop=True))


def _title_strings(values: Sequence[Any]) -> np.ndarray:
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                    dtype=object)


@dataclass
class TwoTowerEncoder:
    """Turns a frame into the towers' tensors (names: :data:`USER_TENSORS`, :data:`ITEM_TENSORS`).
    ``user_means``/``user_stds`` (after log1p where it applies) and ``title_vocabulary`` (index 0
    padding, 1 out-of-vocabulary, as TextVectorization orders it) are fitted on training rows."""

    user_buckets: int
    item_buckets: int
    category_buckets: int
    tag_buckets: int
    max_tags: int
    max_categories: int
    title_tokens: int
    user_means: list[float] = field(default_factory=list)
    user_stds: list[float] = field(default_factory=list)
    title_vocabulary: list[str] = field(default_factory=list)

    @property
    def numeric_dim(self) -> int:
        """Width of ``user_numeric``: standardised values, then their missing-masks."""
        return 2 * len(USER_NUMERIC)

    @classmethod
    def fit(cls, frame: pd.DataFrame, config: TwoTowerConfig) -> TwoTowerEncoder:
        """Standardisation statistics of the user aggregates over ``frame``'s rows, and the title
        vocabulary over its items (each item's title once: counted per row, popular items' words
        would crowd out the rest of the catalogue)."""
        import keras

        require_columns(frame, USER_COLUMNS + ITEM_COLUMNS, "training")
        means, stds = [], []
        for name, kind in USER_NUMERIC:
            x = transform(floats(frame[name].tolist()), kind)
            finite = x[np.isfinite(x)]
            means.append(float(finite.mean()) if finite.size else 0.0)
            std = float(finite.std()) if finite.size else 0.0
            stds.append(std if std > 1e-9 else 1.0)
        titles = _title_strings(frame.drop_duplicates(S.COL_ITEM, keep="last")[COL_TITLE].tolist())
        vectorizer = keras.layers.TextVectorization(max_tokens=config.title_vocabulary,
                                                    output_sequence_length=config.title_tokens)
        vectorizer.adapt(titles if len(titles) else np.array([""], dtype=object))
        return cls(config.user_buckets, config.item_buckets, config.category_buckets, config.tag_buckets,
                   config.max_tags, config.max_categories, config.title_tokens, means, stds,
                   [str(t) for t in vectorizer.get_vocabulary()])

    @cached_property
    def vectorizer(self) -> Any:
        """The TextVectorization of ``title_vocabulary`` (built once per encoder, not serialised)."""
        import keras

        return keras.layers.TextVectorization(max_tokens=max(len(self.title_vocabulary), 2),
                                              output_sequence_length=self.title_tokens,
                                              vocabulary=self.title_vocabulary)

    def encode_users(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The user tower's tensors, one row per frame row:

        - ``user_hash``: int32 (n,); ``user_numeric``: float32 (n, numeric_dim);
        - ``user_recent_items``: int32 (n, 5), hashed like ``item_hash``, 0 = padding;
        - ``user_top_categories``, ``user_preferred_categories``: int32 (n, max_categories),
          hashed like ``item_category``, 0 = padding.
        """
        require_columns(frame, USER_COLUMNS, "user tower's")
        values, masks = [], []
        for (name, kind), mean, std in zip(USER_NUMERIC, self.user_means, self.user_stds):
            x = transform(floats(frame[name].tolist()), kind)
            missing = ~np.isfinite(x)
            values.append(np.where(missing, 0.0, (x - mean) / std))
            masks.append(missing.astype(np.float64))
        return {
            "user_hash": hash_ids(frame[S.COL_USER].tolist(), self.user_buckets),
            "user_numeric": np.stack(values + masks, axis=1).astype(np.float32).reshape(len(frame), self.numeric_dim),
            "user_recent_items": id_lists(frame[COL_RECENT].tolist(), RECENT_WIDTH, self.item_buckets),
            **{f"user_{name}": id_lists(frame[name].tolist(), self.max_categories, self.category_buckets)
               for name in CATEGORY_LISTS},
        }

    def encode_items(self, frame: pd.DataFrame, as_of: datetime | pd.Timestamp | None = None) -> dict[str, np.ndarray]:
        """The item tower's tensors, one row per frame row:

        - ``item_hash``, ``item_category``: int32 (n,), 0 = missing;
        - ``item_tags``: int32 (n, max_tags); ``item_title``: int32 (n, title_tokens), 0 = padding;
        - ``item_price``: float32 (n,); ``item_age_days``: float32 (n,), days since ``created_at``
          at ``as_of`` when given, else at each row's ``event_timestamp``, else now; -1 = missing.
        """
        require_columns(frame, ITEM_COLUMNS, "item tower's")
        n = len(frame)
        if as_of is not None or S.COL_TS not in frame:
            when = pd.Timestamp(as_of if as_of is not None else datetime.now(UTC))
            row_days = epoch_days([when]).repeat(n)
        else:
            row_days = epoch_days(frame[S.COL_TS])
        titles = _title_strings(frame[COL_TITLE].tolist())
        tokens = (np.asarray(self.vectorizer(titles), dtype=np.int32) if n
                  else np.zeros((0, self.title_tokens), np.int32))
        return {
            "item_hash": hash_ids(frame[S.COL_ITEM].tolist(), self.item_buckets),
            "item_category": hash_ids(frame[S.COL_CATEGORY].tolist(), self.category_buckets),
            "item_tags": hash_tags(frame[COL_TAGS].tolist(), self.max_tags, self.tag_buckets),
            "item_title": tokens.reshape(n, self.title_tokens),
            "item_price": prices(frame[COL_PRICE].tolist()),
            "item_age_days": age_days(row_days, epoch_days(frame[S.COL_CREATED_AT])),
        }

    def encode(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Both towers' tensors of a training frame (user and item columns, ``event_timestamp``)."""
        require_columns(frame, (*USER_COLUMNS, *ITEM_COLUMNS, S.COL_TS), "training")
        return {**self.encode_users(frame), **self.encode_items(frame)}

    # ---- persistence: JSON + one vocabulary file, read back by :meth:`load` -----------------

    def to_json(self) -> dict[str, Any]:
        """Everything but the vocabulary (which :meth:`save` writes one token a line)."""
        return {k: v for k, v in asdict(self).items() if k != "title_vocabulary"}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ENCODER_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        # JSON strings, one a line: a token never holds a newline then, whatever the titles held
        (folder / VOCABULARY_FILE).write_text("".join(json.dumps(t) + "\n" for t in self.title_vocabulary))

    @classmethod
    def load(cls, folder: Path) -> TwoTowerEncoder:
        folder = Path(folder)
        vocabulary = [json.loads(line) for line in (folder / VOCABULARY_FILE).read_text().splitlines() if line]
        return cls(**json.loads((folder / ENCODER_FILE).read_text()), title_vocabulary=vocabulary)


