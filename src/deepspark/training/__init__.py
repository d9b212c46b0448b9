"""Distributed training inside Spark: the `Estimator` and the engine's public entry.

`deepspark.training.engine.fit` / `evaluate` run any backend's job on N ranks with the options
of `deepspark.training.options` (`FitOptions` and its groups); `Estimator` is the facade for a
PyTorch model. The engine's `driver/` and `rank/` modules are its own: nothing outside
`deepspark.training` imports them.
"""

from deepspark.training.backend import Backend
from deepspark.training.driver.estimator import Estimator, TrainingError
from deepspark.training.driver.model_io import class_or_instance_load
from deepspark.training.driver.tf_job import TensorflowBackend
from deepspark.training.engine import FitResult
from deepspark.training.job_spec import JobKind, RankLoop, RankProgram
from deepspark.training.options import (
    DataOptions,
    EvaluateOptions,
    FitOptions,
    LoopOptions,
    RecoveryOptions,
    RunOptions,
    StepOptions,
)

__all__ = [
    "Backend",
    "DataOptions",
    "Estimator",
    "EvaluateOptions",
    "FitOptions",
    "FitResult",
    "JobKind",
    "LoopOptions",
    "RankLoop",
    "RankProgram",
    "RecoveryOptions",
    "RunOptions",
    "StepOptions",
    "TensorflowBackend",
    "TrainingError",
    "class_or_instance_load",
]
