"""The TensorFlow ranker: logits for one user against a batch of candidates, from training examples
to the SavedModel the service scores with. A map of the package, in pipeline order:

- :mod:`~models.ranker.config`: hyperparameters (:class:`RankerConfig`);
- :mod:`~models.ranker.features`: features -> tensors, shared by training and serving
  (:class:`FeatureEncoder`, list features, recent-item similarity);
- :mod:`~models.ranker.network`: the deep-and-wide Keras network and the bag of fold models;
- :mod:`~models.ranker.listwise`: padded lists, the listwise loss, ndcg over lists;
- :mod:`~models.ranker.device` and :mod:`~models.ranker.fit`: the device set-up, one fit and the
  cross-validated fit that picks the ALS blend;
- :mod:`~models.ranker.export` and :mod:`~models.ranker.scorer`: the SavedModel (one user against
  N candidates per call) and its wrapper as the service's ``Scorer``;
- :mod:`~models.ranker.examples` and :mod:`~models.ranker.training`: point-in-time training
  examples on label windows, and training on them;
- :mod:`~models.ranker.two_stage`: the re-ranking step of ``recsys evaluate``;
- :mod:`~models.ranker.job` and :mod:`~models.ranker.pyfunc`: ``recsys train ranker`` with MLflow
  and BentoML, and the registered pyfunc model.

This package re-exports the model side (what the service and the benchmarks import); the training
jobs are imported from their modules, so importing ``models.ranker`` loads neither Spark, MLflow
nor TensorFlow.
"""

from models.ranker.config import RankerConfig
from models.ranker.export import export_ranker
from models.ranker.features import (
    ITEM_EMBEDDING,
    ITEM_INPUTS,
    ITEM_STATS,
    RECENT,
    USER_EMBEDDING,
    USER_INPUTS,
    FeatureEncoder,
    recent_matrix,
    recent_similarity,
)
from models.ranker.fit import FitResult, fit_ranker, fit_ranker_cv
from models.ranker.scorer import RankerScorer, load_scorer

__all__ = [
    "ITEM_EMBEDDING",
    "ITEM_INPUTS",
    "ITEM_STATS",
    "RECENT",
    "USER_EMBEDDING",
    "USER_INPUTS",
    "FeatureEncoder",
    "FitResult",
    "RankerConfig",
    "RankerScorer",
    "export_ranker",
    "fit_ranker",
    "fit_ranker_cv",
    "load_scorer",
    "recent_matrix",
    "recent_similarity",
]
