"""`KerasEstimator`: a Keras 3 model trained, evaluated and run on Spark DataFrames.

Driver side. Built by ``Estimator.from_keras`` (see `build_keras_estimator`).

Both backends train through `Estimator.fit` and ``evaluate``, and so the engine's one entry
(`deepspark.training.engine.fit`); only the backend differs: on ``"torch"`` the engine's torch
loop trains a `torch_backend.KerasModule` (``get_model()``); on ``"tensorflow"`` a
`deepspark.training.TensorflowBackend` hands the ``.keras`` model and its compile arguments to
the engine's TensorFlow loop, and the trained weights come back into ``keras_model``.
``predict``, ``save`` and ``load`` are shared by both backends.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from deepspark.persist.keras_estimator_dir import (
    SavedKerasEstimator,
    compile_arguments,
    compiled_keras_bytes,
    load_keras_estimator,
    save_keras_estimator,
)
from deepspark.persist.keras_files import chosen_backend, import_keras, is_keras_model
from deepspark.training import (
    Backend,
    Estimator,
    FitOptions,
    TensorflowBackend,
    class_or_instance_load,
)

__all__ = ["KerasEstimator", "build_keras_estimator"]


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
    compile_arguments : dict
        ``optimizer``, ``loss``, ``loss_weights`` and ``metrics`` as ``model.compile`` takes
        them: what the TensorFlow loop compiles the model with, and what `save` writes.
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
        self.compile_arguments = {
            "optimizer": optimizer,
            "loss": loss,
            "loss_weights": loss_weights,
            "metrics": metrics,
        }
        if backend == "torch":
            from deepspark.keras.torch_backend import (
                KerasLoss,
                KerasModule,
                KerasOptimizerFactory,
                engine_metrics,
            )

            module = KerasModule(keras_model)
            trains = loss is not None
            super().__init__(
                model=module,
                optimizer=KerasOptimizerFactory(optimizer)
                if trains and optimizer is not None
                else None,
                loss=KerasLoss(loss, module.output_names, loss_weights) if trains else None,
                metrics=engine_metrics(metrics, module.output_names),
                scheduler=scheduler,
                config=config,
                use_gpu=use_gpu,
            )
        else:  # the engine's TensorFlow loop trains it; predict runs the Keras model
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
        *,
        validation_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        options: FitOptions | None = None,
        **keywords: Any,
    ) -> pd.DataFrame:
        """Train on `df` as `Estimator.fit` does (the same options); Keras callbacks are
        honoured.

        ``keras.callbacks.EarlyStopping``, ``ModelCheckpoint`` and ``CSVLogger`` act as in
        Keras, across every rank (monitor names ``"val_loss"``, ``"val_accuracy"``, ``"loss"``
        read the history's ``val_loss``, ``val_accuracy``, ``train_loss``); other Keras
        callbacks run on rank 0 with Keras's interface; ``TensorBoard``, ``BackupAndRestore``,
        ``ReduceLROnPlateau``, ``LearningRateScheduler`` and ``ProgbarLogger`` are refused
        with what to use instead (see `deepspark.keras.keras_callbacks`).
        """
        options = FitOptions.from_keywords(
            options,
            feature_cols=feature_cols,
            label_cols=label_cols,
            callbacks=callbacks,
            **keywords,
        )
        if self.backend == "tensorflow":  # Keras callbacks run as they are in its loop
            return super().fit(df, validation_data=validation_data, options=options)
        from deepspark.keras.keras_callbacks import report_back, translate_callbacks

        engine_callbacks, pairs = translate_callbacks(options.callbacks)
        options = dataclasses.replace(options, callbacks=tuple(engine_callbacks))
        history = super().fit(df, validation_data=validation_data, options=options)
        report_back(pairs, history)
        return history

    def _backend(self, optimizer_state: bytes | None = None) -> Backend:
        """The torch loop's backend on ``"torch"``; on ``"tensorflow"`` the TensorFlow loop's,
        which trains the ``.keras`` model with these compile arguments."""
        if self.backend != "tensorflow":
            return super()._backend(optimizer_state)
        return TensorflowBackend(self.keras_model, config=self.config, **self.compile_arguments)

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
        keras_bytes = compiled_keras_bytes(self.keras_model, self.backend, self.compile_arguments)
        saved = SavedKerasEstimator(
            backend=self.backend,
            keras_bytes=keras_bytes,
            config=self.config,
            feature_cols=self._feature_cols,
            history=self.history,
            optimizer_state=self._optimizer_state,
        )
        return save_keras_estimator(saved, path)

    @class_or_instance_load
    def load(cls, path: str, *, metrics: Sequence[Any] | None = None) -> KerasEstimator:
        """Load a ``.keras`` file, or a directory written by `save`; ``est.load(path)`` loads
        into ``est`` and returns it.

        The compile arguments saved in the file (optimizer, loss, metrics) come back, so the
        estimator trains on; ``metrics`` replaces the saved ones. The backend is this
        process's Keras backend (``KERAS_BACKEND``), or the directory's.
        """
        saved = load_keras_estimator(path)
        arguments = compile_arguments(saved.model)
        if metrics is not None:
            arguments["metrics"] = metrics
        estimator = build_keras_estimator(
            saved.model, backend=saved.backend, config=saved.config, **arguments
        )
        estimator._feature_cols = saved.feature_cols
        estimator.history = saved.history
        estimator._optimizer_state = saved.optimizer_state
        return estimator


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
