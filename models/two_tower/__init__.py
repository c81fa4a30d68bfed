"""The two-tower retrieval model: a user tower and an item tower whose L2-normalised 128-d vectors
retrieve candidates by dot product. A map of the package, in pipeline order:

- :mod:`~models.two_tower.config`: hyperparameters (:class:`TwoTowerConfig`);
- :mod:`~models.two_tower.features`: the input columns and :class:`TwoTowerEncoder` (frames ->
  tensors, fitted on training rows, saved as JSON + vocabulary), shared by training and serving;
- :mod:`~models.two_tower.network`: the two Keras towers (shared item-id and category tables);
- :mod:`~models.two_tower.losses`: in-batch softmax with the logQ correction, and sampled BCE;
- :mod:`~models.two_tower.evaluation`: validation recall@k (exact, whole catalogue) and AUC;
- :mod:`~models.two_tower.training`: :func:`train_two_tower` (either loss or ``auto``);
- :mod:`~models.two_tower.export`: the SavedModels folder and :func:`load_two_tower`;
- :mod:`~models.two_tower.job`: ``recsys train two-tower`` (positives, point-in-time frames from
  Feast, the time split, MLflow, BentoML); :mod:`~models.two_tower.pyfunc`: the registered model.

Importing this package loads neither TensorFlow nor Keras.
"""

from models.two_tower.config import TwoTowerConfig
from models.two_tower.export import LoadedTwoTower, export_two_tower, load_two_tower
from models.two_tower.features import ITEM_COLUMNS, USER_COLUMNS, TwoTowerEncoder
from models.two_tower.training import TrainedTwoTower, train_two_tower

__all__ = [
    "ITEM_COLUMNS",
    "USER_COLUMNS",
    "LoadedTwoTower",
    "TrainedTwoTower",
    "TwoTowerConfig",
    "TwoTowerEncoder",
    "export_two_tower",
    "load_two_tower",
    "train_two_tower",
]
