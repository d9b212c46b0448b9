"""Keras callbacks in a distributed fit: each one translated to what means the same there.

Driver side builds the translation; the callbacks themselves run in the ranks (no pyspark).

* ``keras.callbacks.EarlyStopping`` becomes deepspark's :class:`EarlyStopping` (every rank sees
  the same reduced record and stops after the same epoch); after ``fit`` the Keras object has
  ``stopped_epoch``, ``best`` and ``best_epoch`` as Keras sets them.
* ``keras.callbacks.CSVLogger`` becomes deepspark's :class:`CSVLogger` (rank 0 writes, retries
  drop the rows they train again).
* ``keras.callbacks.ModelCheckpoint`` becomes :class:`KerasModelCheckpoint`: rank 0 writes
  Keras's own files (``.keras``, or ``.weights.h5`` with ``save_weights_only``) at Keras's
  ``filepath`` template (``{epoch}`` counts from 1, as in Keras, and the record's values).
* ``TensorBoard``, ``BackupAndRestore``, ``ReduceLROnPlateau``, ``LearningRateScheduler``,
  ``ProgbarLogger`` are refused with what to use instead (a learning rate changed on one rank
  would part the replicas).
* Any other Keras callback runs on rank 0 with Keras's interface (``set_model``,
  ``on_train_begin``, ``on_epoch_begin/end(epoch, logs)``, ``on_train_batch_end``,
  ``on_train_end``); setting ``model.stop_training = True`` stops every rank.
"""

from __future__ import annotations

import math
import os
from typing import Any

from deepspark.training.callbacks import Callback, CallbackState
from deepspark.training.callbacks.monitoring import beats, monitor_direction, monitored_value

__all__ = ["KerasCallbackRunner", "KerasModelCheckpoint", "translate_callbacks"]

_REFUSED = {
    "TensorBoard": "use deepspark.training.callbacks.TensorBoardCallback(log_dir)",
    "BackupAndRestore": "fit(checkpoint_dir=..., max_failures=N) resumes a failed fit",
    "ReduceLROnPlateau": "a torch scheduler: Estimator.from_keras(..., scheduler=lambda opt: "
    "torch.optim.lr_scheduler.ReduceLROnPlateau(opt)) steps on every rank alike",
    "LearningRateScheduler": "a keras.optimizers.schedules schedule as the optimizer's "
    "learning_rate, or scheduler= with a torch scheduler",
    "ProgbarLogger": "the driver shows a progress bar (fit(progress=True))",
}


def _is_keras_callback(callback: Any) -> bool:
    return any(
        cls.__module__.split(".")[0] == "keras" and cls.__name__ == "Callback"
        for cls in type(callback).__mro__
    )


def translate_callbacks(callbacks: Any) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """The engine's callbacks for ``callbacks``, and the (Keras, engine) pairs to report back.

    deepspark callbacks pass as they are. Refused Keras callbacks raise ``ValueError``.
    """
    from deepspark.training.callbacks import CSVLogger, EarlyStopping

    translated: list[Any] = []
    pairs: list[tuple[Any, Any]] = []
    for callback in list(callbacks or []):
        if not _is_keras_callback(callback):
            translated.append(callback)
            continue
        name = type(callback).__name__
        if name in _REFUSED:
            raise ValueError(
                f"callbacks: keras.callbacks.{name} cannot run in a distributed fit here; "
                f"{_REFUSED[name]}"
            )
        if name == "History":
            continue  # fit returns the history
        if name == "EarlyStopping":
            if getattr(callback, "start_from_epoch", 0):
                raise ValueError(
                    "callbacks: keras EarlyStopping(start_from_epoch=...) is not supported"
                )
            engine = EarlyStopping(
                monitor=engine_key(callback.monitor),
                patience=int(callback.patience),
                mode=_mode_of(callback),
                min_delta=abs(float(callback.min_delta)),
                restore_best_weights=bool(callback.restore_best_weights),
                baseline=callback.baseline,
            )
        elif name == "CSVLogger":
            engine = CSVLogger(callback.filename, separator=callback.sep, append=callback.append)
        elif name == "ModelCheckpoint":
            engine = KerasModelCheckpoint(
                filepath=os.fspath(callback.filepath),
                monitor=engine_key(callback.monitor),
                mode=_mode_of(callback),
                save_best_only=bool(callback.save_best_only),
                save_weights_only=bool(callback.save_weights_only),
                initial_value_threshold=getattr(callback, "best", None),
            )
        else:
            engine = KerasCallbackRunner(callback)
        translated.append(engine)
        pairs.append((callback, engine))
    return translated, pairs


def engine_key(monitor: str) -> str:
    """The history key of a Keras monitor name: ``loss`` is ``train_loss``, ``val_acc`` is
    ``val_accuracy`` (metric names as `torch_backend.engine_metrics` maps them).

    Examples
    --------
    >>> engine_key("loss"), engine_key("val_sparse_categorical_accuracy")
    ('train_loss', 'val_accuracy')
    """
    from deepspark.keras.torch_backend import engine_metric_name

    prefix = "val_" if monitor.startswith("val_") else "train_"
    name = monitor.removeprefix("val_").removeprefix("train_")
    return prefix + engine_metric_name(name)


def _mode_of(callback: Any) -> str:
    """Keras's resolved mode: its ``monitor_op`` is ``np.less`` / ``np.greater`` (or None)."""
    mode = getattr(callback, "mode", "auto")
    if mode in ("min", "max"):
        return mode
    return "auto"


def report_back(pairs: list[tuple[Any, Any]], history: Any) -> None:
    """Set on the user's Keras objects what Keras would have set after ``fit``."""
    for keras_callback, engine in pairs:
        if type(keras_callback).__name__ == "EarlyStopping":
            keras_callback.stopped_epoch = engine.stopped_epoch or 0
            keras_callback.best = engine.best_score
            keras_callback.best_epoch = engine.best_epoch or 0


class KerasModelCheckpoint(Callback):
    """Keras's ``ModelCheckpoint`` on rank 0: Keras files at Keras's ``filepath`` template."""

    rank_zero_only = True

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        save_weights_only: bool = False,
        initial_value_threshold: float | None = None,
    ) -> None:
        self.filepath = filepath
        self.monitor = monitor
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self._direction = monitor_direction(monitor, mode)
        threshold = initial_value_threshold
        self.best = None if threshold is None or not math.isfinite(threshold) else threshold

    def on_epoch_end(self, state: CallbackState) -> None:
        from deepspark.persist.keras_files import import_keras, without_tensorflow

        logs = state.logs
        if self.save_best_only:
            value = monitored_value("ModelCheckpoint", self.monitor, logs)
            if not beats(value, self.best, self._direction):
                return
            self.best = value
        path = self.filepath.format(**{**_keras_logs(logs), "epoch": state.epoch + 1})
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        keras_model = state.model.keras_model
        with without_tensorflow(import_keras(None)):
            if self.save_weights_only:
                keras_model.save_weights(path)
            else:
                keras_model.save(path)


class KerasCallbackRunner(Callback):
    """Runs a Keras callback on rank 0 with Keras's interface and the epoch's reduced values."""

    rank_zero_only = True

    def __init__(self, keras_callback: Any) -> None:
        self.keras_callback = keras_callback

    def _model(self, state: CallbackState) -> Any:
        return getattr(state.model, "keras_model", state.model)

    def on_train_begin(self, state: CallbackState) -> None:
        model = self._model(state)
        self.keras_callback.set_model(model)
        self.keras_callback.set_params({**state.params, "steps": None, "verbose": 0})
        model.stop_training = False
        self.keras_callback.on_train_begin({})

    def on_epoch_begin(self, state: CallbackState) -> None:
        self.keras_callback.on_epoch_begin(state.epoch, {})

    def on_batch_end(self, state: CallbackState) -> None:
        self.keras_callback.on_train_batch_end(state.step, dict(state.logs))
        self._stop_if_asked(state)

    def on_epoch_end(self, state: CallbackState) -> None:
        self.keras_callback.on_epoch_end(state.epoch, _keras_logs(state.logs))
        self._stop_if_asked(state)

    def on_train_end(self, state: CallbackState) -> None:
        self.keras_callback.on_train_end(_keras_logs(state.logs))

    def _stop_if_asked(self, state: CallbackState) -> None:
        model = self._model(state)
        if getattr(model, "stop_training", False):
            state.stop_training = True


def _keras_logs(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch record with Keras's key for the train loss (``loss``) besides deepspark's."""
    logs = dict(record)
    if "train_loss" in logs:
        logs.setdefault("loss", logs["train_loss"])
    for key, value in record.items():
        if key.startswith("train_") and key != "train_rows":
            logs.setdefault(key.removeprefix("train_"), value)
    return logs
