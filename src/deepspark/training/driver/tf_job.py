"""The TensorFlow loop's backend of the engine: a Keras 3 model trained under
``tf.distribute``.

Driver side. `TensorflowBackend` tells the engine (`deepspark.training.engine`) what the
ranks build: the Keras model as ``.keras`` bytes and its compile arguments, with Keras objects
as their configs (their variables belong to the driver's backend). The engine runs them with
its TensorFlow loop (``RankLoop.TENSORFLOW``, `deepspark.training.rank._tf_rank`: one
``MultiWorkerMirroredStrategy`` worker per Spark task, in a process of its own), with the same
job data, recovery and progress as the torch loop. Keras is imported only when a job is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from deepspark.training.backend import Backend
from deepspark.training.job_spec import JobKind, RankLoop, RankProgram
from deepspark.training.options import FitOptions, LoopOptions

__all__ = ["TensorflowBackend"]

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


@dataclass
class TensorflowBackend(Backend):
    """A Keras model and its compile arguments (as ``model.compile`` takes them), trained by
    the TensorFlow loop.

    The whole partition is spilled before the first step (``stream_first_epoch`` has no
    effect); data creators are refused.
    """

    keras_model: Any
    optimizer: Any = "adam"
    loss: Any = None
    loss_weights: Any = None
    metrics: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    loop = RankLoop.TENSORFLOW
    takes_creators = False

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
        if self.loss is None or self.optimizer is None:
            raise ValueError(
                "fit needs a loss and an optimizer: Estimator.from_keras(model, "
                "optimizer='adam', loss='sparse_categorical_crossentropy', ...)"
            )
        data = dataclasses.replace(options.data, step_policy=options.data.step_policy or "pad")
        return dataclasses.replace(options, data=data)

    def program(self, kind: JobKind) -> RankProgram:
        """The Keras model as ``.keras`` bytes and its portable compile arguments."""
        import keras  # the driver's Keras, whichever backend it runs

        from deepspark.persist.keras_files import (
            keras_to_bytes,
            portable_keras_objects,
            portable_keras_optimizer,
        )
        from deepspark.training.driver.checks import pickled

        optimizer = self.optimizer
        if optimizer is not None:
            optimizer = portable_keras_optimizer(optimizer, keras)
        loss = portable_keras_objects(self.loss, "loss")
        return RankProgram(
            model_blob=cloudpickle.dumps(("keras-file", keras_to_bytes(self.keras_model))),
            loss_blob=pickled("loss", (loss, self.loss_weights)),
            optimizer_blob=None if optimizer is None else pickled("optimizer", optimizer),
            metrics_blob=pickled("metrics", portable_keras_objects(self.metrics, "metric")),
            config=dict(self.config),
        )

    def load_weights(self, blob: bytes) -> None:
        """Rank 0's weights (safetensors, by position) into the driver's Keras model."""
        from deepspark.persist.weights import weights_from_bytes

        state = weights_from_bytes(blob)
        values = [state[name].numpy() for name in sorted(state)]
        if len(values) != len(self.keras_model.weights):
            raise RuntimeError(
                f"the job sent {len(values)} weights back for a model of "
                f"{len(self.keras_model.weights)}"
            )
        self.keras_model.set_weights(values)
