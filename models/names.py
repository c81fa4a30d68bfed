"""The names that tie training to its tracking and serving: MLflow experiments, registered
model names, BentoML model names and the label that links a BentoML model to its MLflow run."""

from __future__ import annotations

#: MLflow experiment of the training jobs (ALS, the item index, the ranker, the two towers).
TRAINING_EXPERIMENT = "training"
#: MLflow experiment of ``recsys evaluate`` (in the evaluation workspace's own store).
EVALUATION_EXPERIMENT = "evaluation"

#: MLflow registered (pyfunc) model names.
ALS_MODEL_NAME = "recsys-als"
INDEX_MODEL_NAME = "recsys-item-index"
RANKER_MODEL_NAME = "recsys-ranker"
TWO_TOWER_MODEL_NAME = "recsys-two-tower"

#: BentoML model names (``bentos/service.py`` pins them).
BENTO_INDEX_MODEL = "item_index"
BENTO_RANKER_MODEL = "ranker"
#: not served yet: ``bentos/`` does not pin it
BENTO_TWO_TOWER_MODEL = "two_tower"

#: BentoML label holding the MLflow run id of the model it stores.
RUN_ID_LABEL = "mlflow_run_id"
