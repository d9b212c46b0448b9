"""Distributed training inside Spark: the `Estimator` and the engine's public entry.

`deepspark.training.engine.fit` / `evaluate` run any backend's job on N ranks with the options
of `deepspark.training.options` (`FitOptions` and its groups); `Estimator` is the facade for a
PyTorch model. `run` runs a user's own function or script on N ranks through the same job
runner (`FunctionBackend`), and `shard`, `checkpoint` and `restore` serve that function on its
ranks. The engine's `driver/` and `rank/` modules are its own: nothing outside
`deepspark.training` imports them.
"""

from deepspark.context.workers import warm_modules
from deepspark.training.backend import Backend
from deepspark.training.driver.estimator import Estimator, TrainingError
from deepspark.training.driver.function_job import FunctionBackend, RunError, run
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
from deepspark.training.rank.function_state import checkpoint, restore
from deepspark.training.rank.shard import ShardDataset, shard

# What a rank imports: init_context's warm-up imports it in the workers ahead of the first fit
# (the metrics, with torchmetrics, also on the driver, whose checks update every metric once).
warm_modules("deepspark.training.rank.run", "deepspark.training.rank.loop")
warm_modules("deepspark.training.rank.metrics", driver=True)

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
