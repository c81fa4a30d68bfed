"""Ranker exports wrapped inside TensorFlow, loaded by the product as any ranker (no hook in it):
:func:`wrapped_ranker` copies a trained export with its ``serve`` signature (names, shapes,
dtypes) kept and its scores passed through a TensorFlow transform; :func:`reversed_ranker` negates
them (a ranker that ranks its candidates in reverse); :func:`als_ranker` scores each candidate by
its ALS score alone (a ranker that agrees with ALS); :func:`hanging_ranker`, for a real
`bentoml serve`, makes a call for a user with an embedding first read a FIFO
(:class:`FifoGate`), which blocks in the ``ReadFile`` op, outside the GIL, until the gate is
released; a call with an all-zero user embedding (the service's start-up warm-up, an unknown
user) runs the model at once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from models.ranker.export import QUANTIZATION_FILE, QUANTIZED_FILE, SAVED_MODEL_DIR, SERVE_ENDPOINT
from models.ranker.scorer import concrete_endpoint

#: the ``serve`` signature's inputs, in the order export_ranker declares them
_INPUTS = ("user", "items", "item_category", "user_embedding", "item_embedding")

#: ``transform(scores, inputs, state)``: the wrapped export's scores from the inner one's
#: (``inputs``: the call's tensors by input name; ``state``: the wrapper's tracked variables)
Transform = Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any]


class FifoGate:
    """A named pipe at ``path``: opening it for reading blocks until a writer opens it.
    :meth:`release` opens it read-write and keeps it open (Linux: that counts as a writer), so
    every blocked reader wakes and no later one blocks (their read then fails: a FIFO has no
    offsets). Use it as a context manager so a failing test never leaves readers blocked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        os.mkfifo(self.path)
        self._fd: int | None = None

    def release(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)

    def close(self) -> None:
        """Release, then drop the pipe; call once nothing reads it any more (the server stopped)."""
        self.release()
        assert self._fd is not None
        os.close(self._fd)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FifoGate:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def wrapped_ranker(source: Path, folder: Path, transform: Transform,
                   state: Mapping[str, Callable[[], Any]] | None = None) -> Path:
    """A copy of the ranker export ``source`` in ``folder`` whose SavedModel is ``source``'s
    wrapped: the same ``serve`` signature (names, shapes, dtypes), its scores ``transform``'s of
    the inner ones. ``state``: factories of the ``tf.Variable`` s the transform reads, created and
    tracked by the wrapper (saved with it). Full precision only (the int8 variant and its report
    are dropped, so ``auto`` serves the SavedModel). Returns ``folder``."""
    import tensorflow as tf

    folder = Path(shutil.copytree(source, folder))
    for name in (QUANTIZED_FILE, QUANTIZATION_FILE):
        (folder / name).unlink(missing_ok=True)
    inner = tf.saved_model.load(str(source / SAVED_MODEL_DIR))
    endpoint = concrete_endpoint(getattr(inner, SERVE_ENDPOINT))
    specs = _input_specs(endpoint)

    class Wrapped(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.state = {name: make() for name, make in (state or {}).items()}

        @tf.function(input_signature=[specs[name] for name in _INPUTS])
        def serve(self, user: Any, items: Any, item_category: Any, user_embedding: Any, item_embedding: Any) -> Any:
            inputs = {"user": user, "items": items, "item_category": item_category,
                      "user_embedding": user_embedding, "item_embedding": item_embedding}
            return transform(endpoint(**inputs), inputs, self.state)

    shutil.rmtree(folder / SAVED_MODEL_DIR)
    tf.saved_model.save(Wrapped(), str(folder / SAVED_MODEL_DIR))
    return folder


def reversed_ranker(source: Path, folder: Path) -> Path:
    """``source`` wrapped to return its scores negated: each list ranked in reverse (its worst
    candidates first), a ranker worse than ``source`` whenever ``source`` beats chance."""
    return wrapped_ranker(source, folder, lambda scores, inputs, state: -scores)


def als_ranker(source: Path, folder: Path) -> Path:
    """``source`` wrapped to score each candidate by its ALS score, the user embedding . the
    item embedding (the model's own scores ignored): each list in the ALS order of its vectors."""
    import tensorflow as tf

    def als_score(scores: Any, inputs: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
        return tf.linalg.matvec(inputs["item_embedding"], inputs["user_embedding"])

    return wrapped_ranker(source, folder, als_score)


def hanging_ranker(source: Path, folder: Path, gate: FifoGate) -> Path:
    """``source`` wrapped so that a user with a non-zero embedding waits for ``gate`` first (the
    outputs are unchanged)."""
    import tensorflow as tf

    def wait_for_the_gate(scores: Any, inputs: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
        def wait() -> Any:
            return 0.0 * tf.cast(tf.strings.length(tf.io.read_file(state["gate"])), tf.float32)

        # the scores depend on the read, so the call cannot return before the gate opens
        waited = tf.cond(tf.reduce_any(tf.not_equal(inputs["user_embedding"], 0.0)), wait, lambda: tf.constant(0.0))
        return scores + waited

    # a variable, not a constant: Grappler's constant folding must not run the read at load
    return wrapped_ranker(source, folder, wait_for_the_gate,
                          {"gate": lambda: tf.Variable(str(gate.path), dtype=tf.string, trainable=False)})


def _input_specs(endpoint: Any) -> dict[str, Any]:
    """The endpoint's input ``TensorSpec`` by name, named as the service passes them."""
    import tensorflow as tf

    args, kwargs = endpoint.structured_input_signature
    flat = [*tf.nest.flatten(args), *tf.nest.flatten(kwargs)]
    specs = {spec.name: tf.TensorSpec(spec.shape, spec.dtype, name=spec.name) for spec in flat}
    missing = [name for name in _INPUTS if name not in specs]
    if missing:
        raise ValueError(f"the ranker's {SERVE_ENDPOINT!r} signature lacks inputs {missing}: got {sorted(specs)}")
    return specs
