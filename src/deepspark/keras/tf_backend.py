"""Keras 3 on the TensorFlow backend, as a backend of the training engine.

Driver side. `TensorflowBackend` tells the engine (`deepspark.training.engine`) what the
ranks of a `KerasEstimator`'s job build: the Keras model as ``.keras`` bytes and the compile
arguments, with Keras objects as their configs (their variables belong to the driver's
backend). The engine runs them with its TensorFlow loop (``RankLoop.TENSORFLOW``: one
``MultiWorkerMirroredStrategy`` worker per Spark task, in a process of its own), with the same
job data, recovery and progress as the torch loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cloudpickle

from deepspark.training import Backend, FitOptions, JobKind, LoopOptions, RankLoop, RankProgram

__all__ = ["TensorflowBackend", "set_keras_weights"]

# The loop options the TensorFlow loop has no use for: another value than the default is
# refused with what to do instead.
_UNSUPPORTED = (
    "max_steps",
    "steps_per_epoch",
    "validate_every_steps",
    "checkpoint_every_steps",
    "accumulate_steps",
    "clip_grad_norm",
    "precision",
)


class TensorflowBackend(Backend):
    """A `KerasEstimator`'s model and compile arguments, trained by the TensorFlow loop.

    The whole partition is spilled before the first step (``stream_first_epoch`` has no
    effect); data creators are refused.
    """

    loop = RankLoop.TENSORFLOW
    takes_creators = False

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def prepare(self, options: FitOptions) -> FitOptions:
        """Refuse the torch loop's options and a fit without loss or optimizer."""
        defaults = LoopOptions()
        for name in _UNSUPPORTED:
            value = getattr(options.loop, name)
            if value != getattr(defaults, name):
                raise ValueError(
                    f"{name}={value!r} is not supported on Keras's TensorFlow backend; leave "
                    "it out, or train on the torch backend (Estimator.from_keras(..., "
                    'backend="torch"))'
                )
        if self.estimator.keras_loss is None or self.estimator.keras_optimizer is None:
            raise ValueError(
                "fit needs a loss and an optimizer: Estimator.from_keras(model, "
                "optimizer='adam', loss='sparse_categorical_crossentropy', ...)"
            )
        data = dataclasses.replace(options.data, step_policy=options.data.step_policy or "pad")
        return dataclasses.replace(options, data=data)

    def program(self, kind: JobKind) -> RankProgram:
        """The Keras model as ``.keras`` bytes and its portable compile arguments."""
        from deepspark.persist.keras_files import keras_to_bytes

        estimator = self.estimator
        optimizer = estimator.keras_optimizer
        if optimizer is not None and not isinstance(optimizer, str):
            import keras

            optimizer = keras.optimizers.serialize(optimizer)
        loss = _portable(estimator.keras_loss, "loss")
        return RankProgram(
            model_blob=cloudpickle.dumps(("keras-file", keras_to_bytes(estimator.keras_model))),
            loss_blob=_pickled("loss", (loss, estimator.keras_loss_weights)),
            optimizer_blob=None if optimizer is None else _pickled("optimizer", optimizer),
            metrics_blob=_pickled("metrics", _portable(estimator.keras_metrics, "metric")),
            config=dict(estimator.config),
        )


def _pickled(what: str, value: Any) -> bytes:
    try:
        return cloudpickle.dumps(value)
    except Exception as error:
        raise ValueError(
            f"the {what} could not be pickled to send to the workers: {error}. Define it at "
            "module level, or use Keras's own names and objects"
        ) from error


def _portable(value: Any, kind: str) -> Any:
    """Keras loss and metric objects as ``("keras-object", kind, config)``; names and
    functions as they are (the TensorFlow loop rebuilds them)."""
    if isinstance(value, dict):
        return {key: _portable(item, kind) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(item, kind) for item in value)
    module = type(value).__module__.split(".")[0]
    if module == "keras" and hasattr(value, "get_config"):
        import keras

        serialize = keras.losses.serialize if kind == "loss" else keras.metrics.serialize
        return ("keras-object", kind, serialize(value))
    return value


def set_keras_weights(model: Any, blob: bytes) -> None:
    """Rank 0's weights (safetensors, by position) into the driver's Keras model."""
    from deepspark.persist.weights import weights_from_bytes

    state = weights_from_bytes(blob)
    values = [state[name].numpy() for name in sorted(state)]
    if len(values) != len(model.weights):
        raise RuntimeError(
            f"the job sent {len(values)} weights back for a model of {len(model.weights)}"
        )
    model.set_weights(values)
