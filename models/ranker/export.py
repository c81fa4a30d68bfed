"""The ranker's SavedModel on disk: its layout (:data:`SAVED_MODEL_DIR`, :data:`META_FILE`,
:data:`ITEM_STATS_FILE`, the reduced-precision variant :data:`QUANTIZED_FILE` and the comparison
:data:`QUANTIZATION_FILE`) and :func:`export_ranker`, whose ``serve`` endpoint scores ONE user
against N candidates in one call: it takes the user's tensors once, the candidates' as a batch,
and computes the list features and the ALS blend over that batch. TensorFlow is imported inside
the functions: importing this module is cheap."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from models.ranker.features import ITEM_STATS
from models.ranker.fit import FitResult
from recsys.arrays import replace_dir

SAVED_MODEL_DIR = "saved_model"
META_FILE = "ranker.json"
ITEM_STATS_FILE = "item_stats.parquet"  # ITEM_STATS per item as of the training cutoff, for serving
SERVE_ENDPOINT = "serve"
#: the same ``serve`` signature as TensorFlow Lite with dynamic-range int8 weights
#: (:func:`write_quantized`); absent when the conversion failed
QUANTIZED_FILE = "ranker_int8.tflite"
#: full precision against :data:`QUANTIZED_FILE` on the same lists (models.ranker.quantize):
#: what ``load_scorer`` reads to choose the variant it serves
QUANTIZATION_FILE = "quantization.json"

log = logging.getLogger(__name__)


def export_ranker(result: FitResult, folder: Path, metadata: Mapping[str, Any] | None = None,
                  item_stats: pd.DataFrame | None = None) -> Path:
    """Write ``folder/saved_model`` (endpoint ``serve``: one user against N candidates),
    ``folder/ranker.json`` (the encoder, config and ``metadata``), ``folder/ranker_int8.tflite``
    (:func:`write_quantized`; the service serves it only once models.ranker.quantize has shown
    it as good and faster) and, when given, ``folder/item_stats.parquet`` (:data:`ITEM_STATS` by
    item id, which the service has no other source for). Replaces ``folder`` whole."""
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
        write_quantized(tmp / SAVED_MODEL_DIR, tmp / QUANTIZED_FILE)
        meta = {"encoder": asdict(enc), "config": asdict(result.config), "device": result.device,
                "rows": result.rows, "positives": result.positives, "history": result.history,
                "blend": result.blend, "validation": result.validation,
                "created": datetime.now(timezone.utc).isoformat(), **dict(metadata or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if item_stats is not None:
            item_stats[[name for name, _ in ITEM_STATS]].to_parquet(tmp / ITEM_STATS_FILE)

    return replace_dir(Path(folder), write)


def write_quantized(saved_model: Path, out: Path) -> Path | None:
    """Convert ``saved_model``'s ``serve`` signature to TensorFlow Lite with dynamic-range
    quantisation (int8 weights, float32 activations, computed on int8 kernels where the weight
    tensor is large enough for the converter to quantise it) and write it to ``out``. Returns
    ``out``, or None when the conversion fails (logged): the full-precision model is then the only
    one, which the service serves. Dynamic range was chosen over float16 weights because float16
    weights are dequantised to float32 on CPU (smaller file, no faster)."""
    import tensorflow as tf

    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SERVE_ENDPOINT])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        out.write_bytes(converter.convert())
    except Exception:  # noqa: BLE001 - a variant that does not convert is skipped, never fatal to the export
        log.warning("the ranker's int8 TFLite variant did not convert: serving full precision only", exc_info=True)
        return None
    return out
