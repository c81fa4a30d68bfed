"""The two towers (:func:`build_towers`, shapes in its docstring): Keras models from the encoder's
tensors to L2-normalised vectors, sharing the item-id and category embedding tables, and
:func:`run_tower`, the one batched call that training, evaluation and serving all use. Keras is
imported inside functions: importing this module is cheap."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from models.two_tower.config import TwoTowerConfig
from models.two_tower.features import ITEM_TENSORS, RECENT_WIDTH, USER_TENSORS, TwoTowerEncoder

if TYPE_CHECKING:
    import keras

TOWER_BATCH = 4096  # rows per tower call: bounded memory, and the same chunks in memory and served


@cache
def custom_layers() -> SimpleNamespace:
    """The towers' two small layers, defined on first use (Keras is not imported before):

    - ``MaskedMean``: (B, L, D) vectors and their (B, L) ids -> (B, D), the mean over ids > 0
      (zeros for a row without any: Keras' masked pooling divides by zero there);
    - ``Bucketize(boundaries)``: (B,) float -> (B,) int32, 0 for a negative value (missing),
      else 1 + the number of boundaries <= the value. Float32 under mixed precision: float16
      rounds 730 days to a half day and a price of 2049 to 2048.
    """
    import keras
    from keras import ops

    class MaskedMean(keras.layers.Layer):
        def call(self, vectors: Any, ids: Any) -> Any:
            mask = ops.expand_dims(ops.cast(ops.greater(ids, 0), vectors.dtype), -1)
            count = ops.maximum(ops.sum(mask, axis=1), ops.cast(1.0, vectors.dtype))
            return ops.sum(vectors * mask, axis=1) / count

    class Bucketize(keras.layers.Layer):
        def __init__(self, boundaries: tuple[float, ...], **kwargs: Any) -> None:
            super().__init__(**{"dtype": "float32", **kwargs})
            self.boundaries = tuple(float(b) for b in boundaries)

        def call(self, values: Any) -> Any:
            values = ops.cast(values, "float32")
            bounds = ops.convert_to_tensor(np.asarray(self.boundaries, np.float32))
            above = ops.sum(ops.cast(ops.expand_dims(values, -1) >= bounds, "int32"), axis=-1)
            return ops.where(values < 0, ops.zeros_like(above), above + 1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "boundaries": self.boundaries}

    return SimpleNamespace(MaskedMean=MaskedMean, Bucketize=Bucketize)


def tower_inputs(encoder: TwoTowerEncoder) -> dict[str, Any]:
    """Every Keras input of both towers by name (shapes in :func:`build_towers`)."""
    import keras

    categories, tags, tokens = encoder.max_categories, encoder.max_tags, encoder.title_tokens
    return {
        "user_hash": keras.Input((), dtype="int32", name="user_hash"),
        "user_numeric": keras.Input((encoder.numeric_dim,), dtype="float32", name="user_numeric"),
        "user_recent_items": keras.Input((RECENT_WIDTH,), dtype="int32", name="user_recent_items"),
        "user_top_categories": keras.Input((categories,), dtype="int32", name="user_top_categories"),
        "user_preferred_categories": keras.Input((categories,), dtype="int32", name="user_preferred_categories"),
        "item_hash": keras.Input((), dtype="int32", name="item_hash"),
        "item_category": keras.Input((), dtype="int32", name="item_category"),
        "item_tags": keras.Input((tags,), dtype="int32", name="item_tags"),
        "item_title": keras.Input((tokens,), dtype="int32", name="item_title"),
        "item_price": keras.Input((), dtype="float32", name="item_price"),
        "item_age_days": keras.Input((), dtype="float32", name="item_age_days"),
    }


def build_towers(encoder: TwoTowerEncoder, config: TwoTowerConfig) -> tuple[keras.Model, keras.Model]:
    """(user tower, item tower). For a batch of B rows (names as the encoder's tensors):

    - user tower: ``user_hash`` int32 (B,), ``user_numeric`` float32 (B, encoder.numeric_dim),
      ``user_recent_items`` int32 (B, 5), ``user_top_categories`` and
      ``user_preferred_categories`` int32 (B, max_categories) -> float32 (B, output_dim);
    - item tower: ``item_hash``, ``item_category`` int32 (B,), ``item_tags`` int32 (B, max_tags),
      ``item_title`` int32 (B, title_tokens), ``item_price``, ``item_age_days`` float32 (B,)
      -> float32 (B, output_dim).

    Each output row has L2 norm 1, so user . item is the cosine. The user tower reads its recent
    items through the item tower's id table and its categories through the item tower's category
    table (one table each, shared): what the item side learns about an item or a category is what
    the user side reads for a user who just saw it.
    """
    import keras
    from keras import layers

    cl = custom_layers()
    inputs = tower_inputs(encoder)
    item_ids = layers.Embedding(encoder.item_buckets, config.id_dim, name="item_id_embedding")
    categories = layers.Embedding(encoder.category_buckets, config.category_dim, name="category_embedding")

    def mean_of(table: Any, ids: Any, name: str) -> Any:
        return cl.MaskedMean(name=f"{name}_mean")(table(ids), ids)

    user_parts = [
        layers.Embedding(encoder.user_buckets, config.id_dim, name="user_id_embedding")(inputs["user_hash"]),
        mean_of(item_ids, inputs["user_recent_items"], "recent_items"),
        mean_of(categories, inputs["user_top_categories"], "top_categories"),
        mean_of(categories, inputs["user_preferred_categories"], "preferred_categories"),
        inputs["user_numeric"],
    ]
    item_parts = [
        item_ids(inputs["item_hash"]),
        categories(inputs["item_category"]),
        mean_of(layers.Embedding(encoder.tag_buckets, config.tag_dim, name="tag_embedding"), inputs["item_tags"],
                "tags"),
        mean_of(layers.Embedding(max(len(encoder.title_vocabulary), 2), config.title_dim, name="title_embedding"),
                inputs["item_title"], "title"),
        layers.Embedding(len(config.price_boundaries) + 2, config.bucket_dim, name="price_embedding")(
            cl.Bucketize(config.price_boundaries, name="price_bucket")(inputs["item_price"])),
        layers.Embedding(len(config.age_boundaries) + 2, config.bucket_dim, name="age_embedding")(
            cl.Bucketize(config.age_boundaries, name="age_bucket")(inputs["item_age_days"])),
    ]
    user = keras.Model({k: inputs[k] for k in USER_TENSORS}, _head(user_parts, config, "user"), name="user_tower")
    item = keras.Model({k: inputs[k] for k in ITEM_TENSORS}, _head(item_parts, config, "item"), name="item_tower")
    return user, item


def _head(parts: list[Any], config: TwoTowerConfig, name: str) -> Any:
    """MLP over the concatenated parts, Dense(output_dim), L2 normalisation; the last two in
    float32 under mixed precision, so the unit norm holds to float32 precision."""
    from keras import layers

    x = layers.Concatenate(name=f"{name}_features")(parts)
    for i, units in enumerate(config.hidden):
        x = layers.Dense(units, activation="relu", name=f"{name}_hidden{i}")(x)
        if config.dropout:
            x = layers.Dropout(config.dropout, seed=config.seed, name=f"{name}_dropout{i}")(x)
    x = layers.Dense(config.output_dim, dtype="float32", name=f"{name}_output")(x)
    return layers.UnitNormalization(dtype="float32", name=f"{name}_vector")(x)


def run_tower(call: Callable[[dict[str, Any]], Any], inputs: Mapping[str, np.ndarray], dim: int,
              batch_size: int = TOWER_BATCH) -> np.ndarray:
    """float32 (n, dim): ``call`` (a tower, or a SavedModel's ``serve``) over ``inputs`` (the
    encoder's tensors of one tower) in chunks of ``batch_size`` rows."""
    n = len(next(iter(inputs.values())))
    chunks = [np.asarray(call({k: v[start:start + batch_size] for k, v in inputs.items()}), dtype=np.float32)
              for start in range(0, n, batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
