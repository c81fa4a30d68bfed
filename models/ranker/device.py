"""Where the ranker trains: whether the Keras backend sees a GPU, and the matching set-up (mixed
precision and a larger batch on a GPU; the same code in float32 on the CPU)."""

from __future__ import annotations

from models.ranker.config import RankerConfig


def gpu_visible() -> bool:
    """Whether the active Keras backend sees a GPU. TensorFlow is the production backend (the
    export is a SavedModel); the network and its training loop run on any Keras 3 backend, which
    is how the GPU path is checked on a machine that has JAX or PyTorch but no TensorFlow build."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def device_name() -> str:
    """``GPU`` when the Keras backend sees one, else ``CPU``."""
    return "GPU" if gpu_visible() else "CPU"


def device_setup(config: RankerConfig) -> tuple[str, int, str]:
    """(device, batch size, previous Keras dtype policy): a visible GPU gets mixed precision and
    a larger batch; the CPU runs the same code in float32."""
    import keras

    previous = keras.mixed_precision.dtype_policy().name
    if gpu_visible():
        keras.mixed_precision.set_global_policy("mixed_float16")
        return "GPU", config.batch_size * config.gpu_batch_multiplier, previous
    return "CPU", config.batch_size, previous
