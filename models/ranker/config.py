"""The ranker's hyperparameters (:class:`RankerConfig`): network shape, training, cross-validation
and the ALS blends tried; invalid combinations fail at construction, naming the values."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LOSSES = ("listwise", "pointwise")


@dataclass(frozen=True)
class RankerConfig:
    """Network and training hyperparameters. On a GPU the batch is ``batch_size *
    gpu_batch_multiplier`` and the layers compute in mixed precision (float16, float32 logits)."""

    #: one layer of 64 and 8 epochs: on ML-100K's label lists a wider/deeper net or fewer
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
