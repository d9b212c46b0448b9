"""`KerasEstimator`: a Keras 3 model trained, evaluated and run on Spark DataFrames.

Driver side. Built by ``Estimator.from_keras`` (see `build_keras_estimator`).

Contract between the backends (read by ``tf_driver.py``)
--------------------------------------------------------
A `KerasEstimator` keeps on itself:

* ``keras_model`` -- the driver's Keras model; after ``fit`` it holds the trained weights.
* ``keras_optimizer`` -- the compile-style optimizer argument as given: a name (``"adam"``) or
  a Keras optimizer object.
* ``keras_loss`` -- the compile-style loss as given (name, Keras loss, function, dict/list per
  output); ``keras_loss_weights`` likewise.
* ``keras_metrics`` -- the compile-style metrics as given (list, or dict by output).
* ``backend`` -- ``"torch"`` or ``"tensorflow"``.
* ``config`` -- the config dict (given to a model creator).
* ``history`` -- a pandas DataFrame, one row per epoch of the last ``fit``.

On the ``"tensorflow"`` backend ``fit`` and ``evaluate`` call::

    deepspark.keras.tf_driver.fit(estimator, df, feature_cols=..., label_cols=...,
                                  **the other keyword arguments of Estimator.fit)
        -> pandas.DataFrame (the history; fit also stores it as estimator.history)
    deepspark.keras.tf_driver.evaluate(estimator, df, feature_cols=..., label_cols=...,
                                       batch_size=..., num_workers=...) -> dict

and they update ``estimator.keras_model``'s weights. ``predict``, ``save`` and ``load`` are
shared by both backends (``deepspark.predict`` runs a Keras model on either). On the ``"torch"``
backend the engine trains a `torch_backend.KerasModule` (``get_model()``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from deepspark.inference.keras_runtime import (
    chosen_backend,
    import_keras,
    is_keras_model,
    keras_to_bytes,
    load_keras_file,
)
from deepspark.training.driver.estimator import Estimator
from deepspark.training.driver.model_io import class_or_instance_load

__all__ = ["KerasEstimator", "build_keras_estimator"]

KERAS_FILE = "model.keras"
METADATA = "metadata.json"
OPTIMIZER = "optimizer.pt"
FORMAT = "deepspark-keras"


class KerasEstimator(Estimator):
    """A Keras 3 model with the means to train it data-parallel inside Spark.

    Build one with ``Estimator.from_keras`` or ``Estimator.load`` a ``.keras`` file. ``fit``,
    ``evaluate``, ``predict``, ``save`` take the arguments of `Estimator`'s. On the torch
    backend training runs through deepspark's engine (DDP); on the TensorFlow backend under
    ``tf.distribute.MultiWorkerMirroredStrategy``.

    Attributes
    ----------
    keras_model : keras.Model
        The driver's model; after ``fit`` it holds the trained weights.
    backend : {"torch", "tensorflow"}
    history : pandas.DataFrame
    """

    def __init__(
        self,
        *,
        keras_model: Any,
        backend: str,
        optimizer: Any = "adam",
        loss: Any = None,
        metrics: Any = None,
        loss_weights: Any = None,
        scheduler: Callable[[Any], Any] | None = None,
        config: dict[str, Any] | None = None,
        use_gpu: bool = False,
    ) -> None:
        self.keras_model = keras_model
        self.backend = backend
        self.keras_optimizer = optimizer
        self.keras_loss = loss
        self.keras_metrics = metrics
        self.keras_loss_weights = loss_weights
        if backend == "torch":
            from deepspark.keras.torch_backend import (
                KerasLoss,
                KerasModule,
                KerasOptimizerFactory,
                engine_metrics,
                keras_optimizer_config,
            )

            module = KerasModule(keras_model)
            trains = loss is not None
            super().__init__(
                model=module,
                optimizer=KerasOptimizerFactory(keras_optimizer_config(optimizer))
                if trains and optimizer is not None
                else None,
                loss=KerasLoss(loss, module.output_names, loss_weights) if trains else None,
                metrics=engine_metrics(metrics, module.output_names),
                scheduler=scheduler,
                config=config,
                use_gpu=use_gpu,
            )
        else:  # the TensorFlow backend trains in tf_driver; predict runs the Keras model
            self.config = dict(config or {})
            self._model = keras_model
            self._optimizer_factory = None
            self.loss = loss
            self.metrics = list(metrics or []) if not isinstance(metrics, dict) else metrics
            self.scheduler = scheduler
            self.use_gpu = use_gpu
            self.steps = None
            self.step_history = pd.DataFrame()
            self.history = pd.DataFrame()
            self._feature_cols = None

    # --- fit / evaluate ---------------------------------------------------------------------

    def fit(
        self,
        df: Any,
        feature_cols: Any = None,
        label_cols: Any = None,
        epochs: int = 1,
        batch_size: int = 32,
        validation_data: Any = None,
        num_workers: int | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        max_failures: int = 0,
        callbacks: Sequence[Any] | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Train on `df` as `Estimator.fit` does; Keras callbacks are honoured.

        ``keras.callbacks.EarlyStopping``, ``ModelCheckpoint`` and ``CSVLogger`` act as in
        Keras, across every rank (monitor names ``"val_loss"``, ``"val_accuracy"``, ``"loss"``
        read the history's ``val_loss``, ``val_accuracy``, ``train_loss``); other Keras
        callbacks run on rank 0 with Keras's interface; ``TensorBoard``, ``BackupAndRestore``,
        ``ReduceLROnPlateau``, ``LearningRateScheduler`` and ``ProgbarLogger`` are refused
        with what to use instead (see `deepspark.keras.keras_callbacks`).
        """
        arguments = {
            "epochs": epochs,
            "batch_size": batch_size,
            "validation_data": validation_data,
            "num_workers": num_workers,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every": checkpoint_every,
            "resume": resume,
            "max_failures": max_failures,
            "seed": seed,
            **options,
        }
        if self.backend == "tensorflow":
            tf_driver = _tf_driver()
            history = tf_driver.fit(
                self,
                df,
                feature_cols=feature_cols,
                label_cols=label_cols,
                callbacks=callbacks,
                **arguments,
            )
            self.history = history
            self._feature_cols = feature_cols
            return history
        from deepspark.keras.keras_callbacks import report_back, translate_callbacks

        engine_callbacks, pairs = translate_callbacks(callbacks)
        self._model.seed = seed  # the ranks seed torch, numpy and random with it
        history = super().fit(
            df, feature_cols, label_cols, callbacks=engine_callbacks or None, **arguments
        )
        report_back(pairs, history)
        return history

    def evaluate(
        self,
        df: Any,
        feature_cols: Any = None,
        label_cols: Any = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        **options: Any,
    ) -> dict[str, float]:
        """Loss and metrics over every row of `df`, as `Estimator.evaluate`."""
        if self.backend == "tensorflow":
            return _tf_driver().evaluate(
                self,
                df,
                feature_cols=feature_cols,
                label_cols=label_cols,
                batch_size=batch_size,
                num_workers=num_workers,
                **options,
            )
        return super().evaluate(df, feature_cols, label_cols, batch_size, num_workers, **options)

    # --- saving -------------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Save as a ``.keras`` file (``path`` ends with ``.keras``) or a directory.

        A ``.keras`` file is Keras's own: the architecture, weights and compile arguments
        (``keras.saving.load_model`` reads it). A directory holds ``model.keras`` and
        ``metadata.json`` (backend, config, feature columns, history) and, after a torch-backend
        ``fit``, ``optimizer.pt``, the optimizer state the next ``fit`` continues from. Both
        load with ``Estimator.load``; loading unpickles no code (custom layers must be
        registered with ``keras.saving.register_keras_serializable``).
        """
        import fsspec

        data = self._keras_bytes()
        fs, root = fsspec.core.url_to_fs(path)
        if root.endswith(".keras"):
            parent = os.path.dirname(root)
            if parent:
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(root, data)
            return path
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{KERAS_FILE}", data)
        metadata = {
            "format": FORMAT,
            "backend": self.backend,
            "config": self.config,
            "feature_cols": self._feature_cols,
            "history": self.history.to_dict(orient="records"),
            "optimizer_state": None if self._optimizer_state is None else OPTIMIZER,
        }
        if self._optimizer_state is not None:
            fs.pipe_file(f"{root}/{OPTIMIZER}", self._optimizer_state)
        fs.pipe_file(f"{root}/{METADATA}", json.dumps(metadata, default=str).encode())
        return path

    def _keras_bytes(self) -> bytes:
        """The model's ``.keras`` bytes, compiled with this estimator's arguments when Keras
        takes them (so ``keras.saving.load_model`` gives a model ready for ``model.fit``)."""
        import warnings

        keras = import_keras(self.backend)
        if self.keras_loss is not None:
            try:
                self.keras_model.compile(
                    optimizer=keras.optimizers.get(self.keras_optimizer or "adam"),
                    loss=self.keras_loss,
                    loss_weights=self.keras_loss_weights,
                    metrics=self.keras_metrics,
                )
            except (TypeError, ValueError) as error:
                warnings.warn(
                    f"the .keras file is saved without compile arguments: Keras refused them "
                    f"({error})",
                    stacklevel=3,
                )
        return keras_to_bytes(self.keras_model)

    @class_or_instance_load
    def load(cls, path: str, *, metrics: Sequence[Any] | None = None) -> KerasEstimator:
        """Load a ``.keras`` file, or a directory written by `save`; ``est.load(path)`` loads
        into ``est`` and returns it.

        The compile arguments saved in the file (optimizer, loss, metrics) come back, so the
        estimator trains on; ``metrics`` replaces the saved ones. The backend is this
        process's Keras backend (``KERAS_BACKEND``), or the directory's.
        """
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        metadata: dict[str, Any] = {}
        keras_path = root
        if fs.isdir(root):
            keras_path = f"{root}/{KERAS_FILE}"
            if fs.exists(f"{root}/{METADATA}"):
                metadata = json.loads(fs.cat_file(f"{root}/{METADATA}"))
        backend = chosen_backend(None if "keras" in _loaded() else metadata.get("backend"))
        with tempfile.TemporaryDirectory(prefix="deepspark-keras-") as folder:
            local = os.path.join(folder, KERAS_FILE)
            fs.get_file(keras_path, local)
            model = load_keras_file(local, backend, compile=True)
        compiled = model.get_compile_config() if hasattr(model, "get_compile_config") else None
        compiled = compiled or {}
        estimator = build_keras_estimator(
            model,
            optimizer=getattr(model, "optimizer", None) or "adam",
            loss=compiled.get("loss"),
            metrics=metrics if metrics is not None else compiled.get("metrics"),
            loss_weights=compiled.get("loss_weights"),
            backend=backend,
            config=metadata.get("config"),
        )
        estimator._feature_cols = metadata.get("feature_cols")
        estimator.history = pd.DataFrame(metadata.get("history") or [])
        if metadata.get("optimizer_state") and backend == "torch":
            estimator._optimizer_state = fs.cat_file(f"{root}/{OPTIMIZER}")
        return estimator


def _loaded() -> set[str]:
    import sys

    return {name for name in ("keras", "tensorflow") if name in sys.modules}


def _tf_driver() -> Any:
    try:
        from deepspark.keras import tf_driver
    except ImportError as error:
        raise NotImplementedError(
            "the tensorflow backend's training is not available in this build "
            f"({error}); use backend='torch'"
        ) from error
    return tf_driver


def build_keras_estimator(
    model: Any,
    optimizer: Any = "adam",
    loss: Any = None,
    metrics: Any = None,
    *,
    backend: str | None = None,
    loss_weights: Any = None,
    scheduler: Callable[[Any], Any] | None = None,
    config: dict[str, Any] | None = None,
    use_gpu: bool = False,
) -> KerasEstimator:
    """The `KerasEstimator` of ``Estimator.from_keras`` (whose docstring tells the arguments)."""
    backend = chosen_backend(backend)
    loaded = sys.modules.get("keras")
    if not (backend == "tensorflow" and loaded is not None):
        # The TensorFlow backend trains in worker processes of its own and takes the model as
        # a .keras file, which any backend writes: the driver's Keras may run another backend.
        import_keras(backend)
    config = dict(config or {})
    if is_keras_model(model):
        keras_model = model
    elif callable(model):
        keras_model = model(config)
        if not is_keras_model(keras_model):
            raise TypeError(
                f"model={getattr(model, '__name__', model)!r} returned "
                f"{type(keras_model).__name__}; a model creator must return a keras.Model"
            )
    else:
        raise TypeError(
            f"model must be a Keras 3 model or a function config -> keras.Model, not "
            f"{type(model).__name__}"
        )
    if not keras_model.built:
        raise ValueError(
            "the Keras model is not built: give it an Input (keras.Input(shape)) or call "
            "model.build(input_shape) first"
        )
    if loss is None and optimizer is not None and optimizer != "adam":
        raise ValueError(
            "from_keras got optimizer= but no loss=: pass loss=, e.g. "
            "'sparse_categorical_crossentropy', to train"
        )
    return KerasEstimator(
        keras_model=keras_model,
        backend=backend,
        optimizer=optimizer,
        loss=loss,
        metrics=metrics,
        loss_weights=loss_weights,
        scheduler=scheduler,
        config=config,
        use_gpu=use_gpu,
    )
