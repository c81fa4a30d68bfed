"""The ranker's network: a small deep-and-wide Keras model over the encoder's tensors
(:func:`build_model`, shapes in its docstring), and the bag of fold models (:func:`average_model`).
Keras is imported inside functions: importing this module is cheap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from models.ranker.config import RankerConfig
from models.ranker.features import N_LIST, FeatureEncoder

if TYPE_CHECKING:
    import keras


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
