"""The two-tower model's hyperparameters (:class:`TwoTowerConfig`): tower shapes, the hashed id
tables, the text and bucket features, the two losses and training; invalid combinations fail at
construction, naming the values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: ``bce``: sigmoid cross-entropy of each positive against ``n_negatives`` uniform items;
#: ``softmax``: in-batch sampled softmax with the logQ correction; ``auto``: train both, keep the
#: one with the higher validation recall@``select_k``.
LOSSES = ("bce", "softmax", "auto")
TRAINED_LOSSES = ("softmax", "bce")  # what ``auto`` trains, in this order (ties: the first)


@dataclass(frozen=True)
class TwoTowerConfig:
    """Network and training hyperparameters. On a GPU the batch is ``batch_size *
    gpu_batch_multiplier`` and the towers compute in mixed precision (float16; the output layer
    and the L2 normalisation in float32)."""

    output_dim: int = 128
    #: ids hash to ``1 + id mod (buckets - 1)`` (0 = missing), so an unseen user or item still
    #: gets a vector: consecutive ids never collide below ``buckets - 1`` of them
    user_buckets: int = 1 << 15
    item_buckets: int = 1 << 15
    id_dim: int = 32
    category_buckets: int = 256
    category_dim: int = 16
    #: tags hash (crc32 of the text) into this many buckets: no vocabulary to ship for them
    tag_buckets: int = 1024
    tag_dim: int = 16
    max_tags: int = 8
    #: TextVectorization over the titles: vocabulary adapted on the training titles only
    title_vocabulary: int = 5000
    title_tokens: int = 12
    title_dim: int = 16
    #: price and item age (days since ``created_at`` at the row's time) as buckets; < the first
    #: boundary is bucket 1, missing is bucket 0
    price_boundaries: tuple[float, ...] = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
    age_boundaries: tuple[float, ...] = (1.0, 7.0, 30.0, 90.0, 180.0, 365.0, 730.0)
    bucket_dim: int = 8
    #: the user's ``top_categories`` / ``preferred_categories`` lists, longest kept
    max_categories: int = 5
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.0
    learning_rate: float = 2e-3
    batch_size: int = 256
    gpu_batch_multiplier: int = 4
    epochs: int = 10
    #: epochs without a better validation recall@``select_k`` before training stops (the best
    #: epoch's weights are restored)
    patience: int = 2
    loss: str = "auto"
    n_negatives: int = 4
    #: the logit is cosine / temperature for both losses: unit vectors' dot lies in [-1, 1], which
    #: a sigmoid or softmax could not push near 0 or 1 without the scale
    temperature: float = 0.05
    #: the k of the validation recall that picks the epoch and, with ``auto``, the loss: the
    #: towers feed a ranker that re-orders the top candidates, so the top 50 is what matters
    select_k: int = 50
    recall_ks: tuple[int, ...] = (10, 50)
    #: sampled negatives per validation positive for the validation AUC
    auc_negatives: int = 20
    seed: int = 42

    def __post_init__(self) -> None:
        problems = []
        for name in ("user_buckets", "item_buckets", "category_buckets", "tag_buckets"):
            if getattr(self, name) < 2:
                problems.append(f"{name}={getattr(self, name)} must be >= 2 (bucket 0 is 'missing')")
        for name in ("output_dim", "id_dim", "category_dim", "tag_dim", "max_tags", "title_vocabulary",
                     "title_tokens", "title_dim", "bucket_dim", "max_categories", "batch_size",
                     "gpu_batch_multiplier", "epochs", "patience", "n_negatives", "auc_negatives"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("price_boundaries", "age_boundaries"):
            bounds = getattr(self, name)
            if not bounds or list(bounds) != sorted(set(bounds)) or bounds[0] <= 0:
                problems.append(f"{name}={bounds} must be non-empty, > 0 and strictly increasing")
        if self.hidden and min(self.hidden) < 1:
            problems.append(f"hidden={self.hidden}: every layer needs >= 1 unit")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be within [0, 1)")
        if self.learning_rate <= 0 or self.temperature <= 0:
            problems.append(f"learning_rate={self.learning_rate} and temperature={self.temperature} must be > 0")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r} must be one of {', '.join(LOSSES)}")
        if not self.recall_ks or min(self.recall_ks) < 1 or self.select_k not in self.recall_ks:
            problems.append(f"recall_ks={self.recall_ks} must be >= 1 and include select_k={self.select_k}")
        if problems:
            raise ValueError("invalid two-tower config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TwoTowerConfig:
        """The inverse of :meth:`to_json` (JSON turns tuples into lists; unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown two-tower config keys {unknown}: written by a newer version?")
        restored: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**restored)
