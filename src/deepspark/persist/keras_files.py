"""Keras models as files and bytes: the backend chosen before Keras is imported, ``.keras``
bytes in and out.

Spark-free; used by the training engine's TensorFlow loop, by inference's Keras predictors and
by the Keras capability. Keras reads its backend (``KERAS_BACKEND``) once, when it is first
imported, so a process runs one backend: :func:`import_keras` sets the variable before that
first import and refuses, with the way out, a process whose Keras already runs another backend.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = [
    "BACKENDS",
    "chosen_backend",
    "import_keras",
    "import_tensorflow",
    "is_keras_model",
    "keras_from_bytes",
    "keras_to_bytes",
    "load_keras_file",
    "model_backend",
    "portable_keras_objects",
    "portable_keras_optimizer",
    "quiet_tensorflow",
    "restored_keras_objects",
    "without_tensorflow",
]

BACKENDS = ("torch", "tensorflow")
"""The Keras backends deepspark runs (jax is refused with a message)."""


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up messages, unless the user set these variables."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def chosen_backend(backend: str | None = None) -> str:
    """The Keras backend to use: ``backend``, else the imported Keras's, else ``KERAS_BACKEND``,
    else Keras's own default (``"tensorflow"``).

    Examples
    --------
    >>> chosen_backend("torch")
    'torch'
    """
    if backend is None:
        keras = sys.modules.get("keras")
        if keras is not None and hasattr(keras, "backend"):
            backend = keras.backend.backend()
        else:
            backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        raise ValueError(
            "the jax backend of Keras is not supported by deepspark: train with "
            'backend="torch" (through deepspark\'s DDP engine) or backend="tensorflow" '
            "(tf.distribute)"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def import_tensorflow() -> Any:
    """Import TensorFlow quietly, or say which extra installs it."""
    quiet_tensorflow()
    try:
        import tensorflow
    except ImportError as error:
        raise ImportError(
            "the tensorflow backend of Keras needs TensorFlow: run `pip install deepspark[tf]`"
        ) from error
    return tensorflow


def import_keras(backend: str | None = None) -> Any:
    """Import Keras 3 running ``backend``; set ``KERAS_BACKEND`` first when Keras is not loaded.

    Raises
    ------
    ImportError
        Keras (or TensorFlow, for that backend) is not installed: the message names the extra.
    RuntimeError
        Keras was already imported in this process with another backend.
    """
    backend = chosen_backend(backend)
    if backend == "tensorflow":
        import_tensorflow()
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
    try:
        import keras
    except ImportError as error:
        raise ImportError(
            "Keras models need Keras 3: run `pip install deepspark[keras]` "
            "(`deepspark[tf]` adds TensorFlow for its backend)"
        ) from error
    found = keras.backend.backend()
    if found != backend:
        raise RuntimeError(
            f"Keras is already imported in this process with the {found!r} backend, so it "
            f"cannot run the {backend!r} backend (Keras reads KERAS_BACKEND once, at import). "
            f"Set KERAS_BACKEND={backend} before importing keras, or pass backend={found!r}; "
            "on Spark's Python workers, which are reused across jobs, run one backend per "
            "session or set spark.python.worker.reuse=false"
        )
    return keras


def is_keras_model(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 model, told without importing Keras."""
    return any(
        cls.__module__.split(".")[0] == "keras" and cls.__name__ == "Model"
        for cls in type(model).__mro__
    )


@contextlib.contextmanager
def without_tensorflow(keras: Any) -> Iterator[None]:
    """Keep Keras's saving code from importing TensorFlow on another backend.

    Keras's serialization asks whether TensorFlow is available (to recognise its shapes and
    dtypes), which imports it when installed: +3 s and +440 MB in every process that loads a
    model. While TensorFlow is not imported no object can be one of its types, so Keras may be
    told it is absent for the time of the call.
    """
    if "tensorflow" in sys.modules or keras.backend.backend() == "tensorflow":
        yield
        return
    try:
        from keras.src.utils import module_utils
    except ImportError:  # another Keras layout: let it import what it needs
        yield
        return
    lazy = [getattr(module_utils, name, None) for name in ("tensorflow", "gfile")]
    lazy = [module for module in lazy if hasattr(module, "_available")]
    saved = [module._available for module in lazy]
    for module in lazy:
        module._available = False
    try:
        yield
    finally:
        for module, available in zip(lazy, saved, strict=True):
            module._available = available


def keras_to_bytes(model: Any) -> bytes:
    """The model as the bytes of a ``.keras`` file (architecture, weights, compile config)."""
    keras = import_keras(model_backend(model))
    with tempfile.TemporaryDirectory(prefix="deepspark-keras-") as folder:
        path = os.path.join(folder, "model.keras")
        with without_tensorflow(keras):
            model.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def keras_from_bytes(data: bytes, backend: str, compile: bool = False) -> Any:
    """A Keras model from the bytes of a ``.keras`` file, on ``backend``."""
    with tempfile.TemporaryDirectory(prefix="deepspark-keras-") as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as handle:
            handle.write(data)
        return load_keras_file(path, backend, compile=compile)


def load_keras_file(path: str, backend: str, compile: bool = False) -> Any:
    """Load a local ``.keras`` file on ``backend`` (unpickles no code; custom layers must be
    registered with ``keras.saving.register_keras_serializable``)."""
    keras = import_keras(backend)
    with without_tensorflow(keras):
        return keras.saving.load_model(path, compile=compile)


def model_backend(model: Any) -> str:
    """The backend a live Keras model runs: its process's Keras backend."""
    return sys.modules["keras"].backend.backend()


def portable_keras_objects(value: Any, kind: str) -> Any:
    """A loss or metrics argument as it travels to other processes: Keras objects as
    ``("keras-object", kind, config)`` (their variables belong to this process's backend);
    names, functions and None as they are; dicts, lists and tuples item by item.

    `kind` is ``"loss"`` or ``"metric"``: which Keras module rebuilds the object
    (`restored_keras_objects`).
    """
    if isinstance(value, dict):
        return {key: portable_keras_objects(item, kind) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable_keras_objects(item, kind) for item in value)
    if type(value).__module__.split(".")[0] == "keras" and hasattr(value, "get_config"):
        keras = sys.modules["keras"]
        with without_tensorflow(keras):
            return ("keras-object", kind, keras.saving.serialize_keras_object(value))
    return value


def portable_keras_optimizer(optimizer: Any, keras: Any) -> Any:
    """A compile-style optimizer as it travels to other processes: a name (checked by
    `keras`), or a Keras optimizer object's serialized config.

    Raises
    ------
    ValueError
        For a name Keras does not know.
    TypeError
        For anything else (a torch optimizer: use ``Estimator.from_torch``).
    """
    if isinstance(optimizer, str):
        try:
            keras.optimizers.get(optimizer)
        except ValueError as error:
            raise ValueError(
                f'optimizer={optimizer!r} is not a Keras optimizer name ("adam", "sgd", '
                f'"rmsprop", "adamw", ...): {error}'
            ) from None
        return optimizer
    if type(optimizer).__module__.split(".")[0] == "keras" and hasattr(optimizer, "apply"):
        with without_tensorflow(keras):
            return keras.optimizers.serialize(optimizer)
    raise TypeError(
        f'optimizer={optimizer!r}: give a Keras optimizer name ("adam") or a '
        "keras.optimizers.Optimizer object"
    )


def restored_keras_objects(value: Any, keras: Any) -> Any:
    """`portable_keras_objects`'s result with the Keras objects rebuilt by `keras`."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "keras-object":
        module = keras.losses if value[1] == "loss" else keras.metrics
        with without_tensorflow(keras):
            return module.deserialize(value[2])
    if isinstance(value, dict):
        return {key: restored_keras_objects(item, keras) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(restored_keras_objects(item, keras) for item in value)
    return value
