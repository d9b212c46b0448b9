"""Saving and loading a Keras estimator: a ``.keras`` file, or a directory around one.

Layout of a saved directory::

    model.keras      the Keras model (architecture, weights, compile arguments)
    metadata.json    format, backend, config, feature columns, history
    optimizer.pt     after a torch-backend fit, the optimizer state the next fit continues
                     from (torch.save of tensors and plain values)

Loading unpickles no code (custom layers must be registered with
``keras.saving.register_keras_serializable``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd

from deepspark.persist.keras_files import (
    chosen_backend,
    import_keras,
    keras_to_bytes,
    load_keras_file,
)

__all__ = [
    "SavedKerasEstimator",
    "compile_arguments",
    "compiled_keras_bytes",
    "holds_keras_model",
    "load_keras_estimator",
    "save_keras_estimator",
]

KERAS_FILE = "model.keras"
METADATA = "metadata.json"
OPTIMIZER = "optimizer.pt"
FORMAT = "deepspark-keras"


@dataclass
class SavedKerasEstimator:
    """What a saved Keras estimator holds; ``model`` is a Keras model (loaded: compiled with
    the saved arguments), ``keras_bytes`` the ``.keras`` file written."""

    backend: str
    model: Any = None
    keras_bytes: bytes = b""
    config: dict[str, Any] = field(default_factory=dict)
    feature_cols: Any = None
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    optimizer_state: bytes | None = None


def compiled_keras_bytes(model: Any, backend: str, arguments: dict[str, Any]) -> bytes:
    """The model's ``.keras`` bytes, compiled with ``arguments`` (``optimizer``, ``loss``,
    ``loss_weights``, ``metrics``, as ``model.compile`` takes them) when it has a loss and
    Keras takes them, so that ``keras.saving.load_model`` gives a model ready for
    ``model.fit``; without them (and a warning) when Keras refuses them."""
    keras = import_keras(backend)
    if arguments.get("loss") is not None:
        try:
            model.compile(
                optimizer=keras.optimizers.get(arguments.get("optimizer") or "adam"),
                loss=arguments["loss"],
                loss_weights=arguments.get("loss_weights"),
                metrics=arguments.get("metrics"),
            )
        except (TypeError, ValueError) as error:
            warnings.warn(
                f"the .keras file is saved without compile arguments: Keras refused them ({error})",
                stacklevel=3,
            )
    return keras_to_bytes(model)


def compile_arguments(model: Any) -> dict[str, Any]:
    """The compile arguments a loaded model carries (``optimizer``, ``loss``, ``metrics``,
    ``loss_weights``); ``optimizer`` is ``"adam"`` and the others None when it has none."""
    compiled = model.get_compile_config() if hasattr(model, "get_compile_config") else None
    compiled = compiled or {}
    return {
        "optimizer": getattr(model, "optimizer", None) or "adam",
        "loss": compiled.get("loss"),
        "metrics": compiled.get("metrics"),
        "loss_weights": compiled.get("loss_weights"),
    }


def holds_keras_model(path: str) -> bool:
    """Whether `path` is a ``.keras`` file or a directory `save_keras_estimator` wrote."""
    fs, root = fsspec.core.url_to_fs(path)
    return root.endswith(".keras") or fs.exists(f"{root.rstrip('/')}/{KERAS_FILE}")


def save_keras_estimator(saved: SavedKerasEstimator, path: str) -> str:
    """Write a ``.keras`` file (`path` ends with ``.keras``) or a directory around one."""
    fs, root = fsspec.core.url_to_fs(path)
    if root.endswith(".keras"):
        parent = os.path.dirname(root)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(root, saved.keras_bytes)
        return path
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{KERAS_FILE}", saved.keras_bytes)
    metadata = {
        "format": FORMAT,
        "backend": saved.backend,
        "config": saved.config,
        "feature_cols": saved.feature_cols,
        "history": saved.history.to_dict(orient="records"),
        "optimizer_state": None if saved.optimizer_state is None else OPTIMIZER,
    }
    if saved.optimizer_state is not None:
        fs.pipe_file(f"{root}/{OPTIMIZER}", saved.optimizer_state)
    fs.pipe_file(f"{root}/{METADATA}", json.dumps(metadata, default=str).encode())
    return path


def load_keras_estimator(path: str) -> SavedKerasEstimator:
    """A saved Keras estimator, its model loaded (compiled) on this process's Keras backend
    (``KERAS_BACKEND``), or the directory's when Keras is not imported yet."""
    fs, root = fsspec.core.url_to_fs(path)
    metadata: dict[str, Any] = {}
    keras_path = root
    if fs.isdir(root):
        keras_path = f"{root}/{KERAS_FILE}"
        if fs.exists(f"{root}/{METADATA}"):
            metadata = json.loads(fs.cat_file(f"{root}/{METADATA}"))
    imported = any(name in sys.modules for name in ("keras", "tensorflow"))
    backend = chosen_backend(None if imported else metadata.get("backend"))
    with tempfile.TemporaryDirectory(prefix="deepspark-keras-") as folder:
        local = os.path.join(folder, KERAS_FILE)
        fs.get_file(keras_path, local)
        model = load_keras_file(local, backend, compile=True)
    state = None
    if metadata.get("optimizer_state") and backend == "torch":
        state = fs.cat_file(f"{root}/{OPTIMIZER}")
    return SavedKerasEstimator(
        backend=backend,
        model=model,
        config=metadata.get("config") or {},
        feature_cols=metadata.get("feature_cols"),
        history=pd.DataFrame(metadata.get("history") or []),
        optimizer_state=state,
    )
