"""Distributed training inside Spark: the `Estimator` and the engine's public entry.

`deepspark.training.engine.fit` / `evaluate` run any backend's job on N ranks with the options
of `deepspark.training.options` (`FitOptions` and its groups); `Estimator` is the facade for a
PyTorch model. `run` runs a user's own function or script on N ranks through the same job
runner (`FunctionBackend`), and `shard`, `checkpoint` and `restore` serve that function on its
ranks. The engine's `driver/` and `rank/` modules are its own: nothing outside
`deepspark.training` imports them.
"""

from deepspark.training.backend import Backend
from deepspark.training.driver.estimator import Estimator, TrainingError
from deepspark.training.driver.function_job import FunctionBackend, RunError, run
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
from deepspark.training.output_losses import OutputLosses
from deepspark.training.rank.function_state import checkpoint, restore
from deepspark.training.rank.shard import ShardDataset, shard

__all__ = [
    "Backend",
    "DataOptions",
    "Estimator",
    "EvaluateOptions",
    "FitOptions",
    "FitResult",
    "FunctionBackend",
    "JobKind",
    "LoopOptions",
    "OutputLosses",
    "RankLoop",
    "RankProgram",
    "RecoveryOptions",
    "RunError",
    "RunOptions",
    "ShardDataModule",
    "ShardDataset",
    "StepOptions",
    "TensorflowBackend",
    "TrainingError",
    "checkpoint",
    "class_or_instance_load",
    "restore",
    "run",
    "shard",
]


def __getattr__(name: str):
    # The Lightning adapter imports lightning, an optional extra: only when asked for.
    if name == "ShardDataModule":
        from deepspark.training.rank.lightning_data import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module 'deepspark.training' has no attribute {name!r}")
