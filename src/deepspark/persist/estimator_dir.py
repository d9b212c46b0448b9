"""Saving and loading an `Estimator` at an fsspec URL.

Layout of a saved directory::

    metadata.json        format version, class names, config, feature columns, history
    weights.safetensors  the model's state dict
    model.pkl            the architecture (cloudpickle; trusted code only)
    training.pkl         loss, optimizer and scheduler factories, metrics, custom steps
                         (cloudpickle)
    optimizer.pt         the last fit's optimizer state, when there is one (torch.save of
                         tensors and plain values; read with weights_only=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import fsspec
import pandas as pd

__all__ = [
    "FORMAT_VERSION",
    "SavedEstimator",
    "load_estimator",
    "load_saved_model",
    "save_estimator",
]

FORMAT_VERSION = 1
METADATA = "metadata.json"
WEIGHTS = "weights.safetensors"
MODEL = "model.pkl"
TRAINING = "training.pkl"
OPTIMIZER = "optimizer.pt"


@dataclass
class SavedEstimator:
    """What a saved estimator directory holds, as the estimator hands it over and gets it back.

    ``model`` carries its weights; ``loss``, ``optimizer_factory``, ``scheduler``, ``metrics``
    and ``steps`` are stored with cloudpickle (trusted code only); ``optimizer_state`` is the
    bytes of `deepspark.persist.optimizer_state`.
    """

    model: Any
    loss: Any = None
    optimizer_factory: Any = None
    scheduler: Any = None
    metrics: Any = None
    steps: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    use_gpu: bool = False
    feature_cols: Any = None
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    optimizer_state: bytes | None = None


def save_estimator(saved: SavedEstimator, path: str) -> str:
    """Write `saved` into the directory `path` (any fsspec URL); metadata.json comes last."""
    from deepspark.persist.weights import weights_to_bytes

    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    model = saved.model
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": saved.config,
        "feature_cols": saved.feature_cols,
        "use_gpu": saved.use_gpu,
        "history": saved.history.to_dict(orient="records"),
        "optimizer_state": None if saved.optimizer_state is None else OPTIMIZER,
    }
    _write(fs, f"{root}/{WEIGHTS}", weights_to_bytes(model.state_dict()))
    _write(fs, f"{root}/{MODEL}", cloudpickle.dumps(model))
    training = {
        "loss": saved.loss,
        "optimizer": saved.optimizer_factory,
        "scheduler": saved.scheduler,
        "metrics": saved.metrics,
        "steps": saved.steps,
    }
    _write(fs, f"{root}/{TRAINING}", cloudpickle.dumps(training))
    if saved.optimizer_state is not None:
        _write(fs, f"{root}/{OPTIMIZER}", saved.optimizer_state)
    elif fs.exists(f"{root}/{OPTIMIZER}"):  # an earlier save's, into the same directory
        fs.rm(f"{root}/{OPTIMIZER}")
    # metadata last: a directory with metadata.json is complete
    _write(fs, f"{root}/{METADATA}", json.dumps(metadata, indent=2, default=str).encode())
    return path


def load_saved_model(path: str):
    """The model of a saved estimator directory, with its weights (unpickles trusted code)."""
    from deepspark.persist.weights import weights_from_bytes

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/{METADATA}"):
        raise FileNotFoundError(
            f"{path} is not a saved deepspark model (no {METADATA}); save one with Estimator.save"
        )
    metadata = json.loads(fs.cat_file(f"{root}/{METADATA}"))
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by a newer deepspark (format {metadata['format_version']}); "
            "upgrade deepspark to load it"
        )
    model = cloudpickle.loads(fs.cat_file(f"{root}/{MODEL}"))
    model.load_state_dict(weights_from_bytes(fs.cat_file(f"{root}/{WEIGHTS}")))
    return model, metadata


def load_estimator(path: str) -> SavedEstimator:
    """What a saved estimator directory holds (unpickles trusted code).

    The optimizer state is checked to read as tensors and plain values before it is kept.
    """
    from deepspark.persist.optimizer_state import optimizer_state_from_bytes

    model, metadata = load_saved_model(path)
    fs, root = fsspec.core.url_to_fs(path)
    training = cloudpickle.loads(fs.cat_file(f"{root}/{TRAINING}"))
    state = None
    if metadata.get("optimizer_state"):
        state = fs.cat_file(f"{root}/{metadata['optimizer_state']}")
        optimizer_state_from_bytes(state, map_location="meta")  # weights_only: no code runs
    return SavedEstimator(
        model=model,
        loss=training["loss"],
        optimizer_factory=training["optimizer"],
        scheduler=training["scheduler"],
        metrics=training["metrics"],
        steps=training.get("steps"),  # saves before custom steps were stored have none
        config=metadata.get("config") or {},
        use_gpu=bool(metadata.get("use_gpu", False)),
        feature_cols=metadata.get("feature_cols"),
        history=pd.DataFrame(metadata.get("history") or []),
        optimizer_state=state,
    )


def _write(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as handle:
        handle.write(data)
