"""Distributed training inside Spark: the `Estimator` and the engine's public entry.

`deepspark.training.engine.fit` / `evaluate` run any backend's job on N ranks with the options
of `deepspark.training.options` (`FitOptions` and its groups); `Estimator` is the facade for a
PyTorch model. `run` runs a user's own function or script on N ranks through the same job
runner (`FunctionBackend`), and `shard`, `checkpoint` and `restore` serve that function on its
ranks. The engine's `driver/` and `rank/` modules are its own: nothing outside
`deepspark.training` imports them.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from deepspark.training.rank.lightning_data import ShardDataModule
    from deepspark.training.rank.shard import ShardDataset, shard

# Each public name and the module it lives in, imported on first use (PEP 562): a rank of
# `deepspark.run` imports `deepspark.training.rank...` without the driver's estimator, its
# metrics (torchmetrics) or the TensorFlow backend, which cost it seconds on a cold worker.
_HOMES = {
    "Backend": "deepspark.training.backend",
    "DataOptions": "deepspark.training.options",
    "Estimator": "deepspark.training.driver.estimator",
    "EvaluateOptions": "deepspark.training.options",
    "FitOptions": "deepspark.training.options",
    "FitResult": "deepspark.training.engine",
    "FunctionBackend": "deepspark.training.driver.function_job",
    "JobKind": "deepspark.training.job_spec",
    "LoopOptions": "deepspark.training.options",
    "OutputLosses": "deepspark.training.output_losses",
    "RankLoop": "deepspark.training.job_spec",
    "RankProgram": "deepspark.training.job_spec",
    "RecoveryOptions": "deepspark.training.options",
    "RunError": "deepspark.training.driver.function_job",
    "RunOptions": "deepspark.training.options",
    "ShardDataModule": "deepspark.training.rank.lightning_data",
    "ShardDataset": "deepspark.training.rank.shard",
    "StepOptions": "deepspark.training.options",
    "TensorflowBackend": "deepspark.training.driver.tf_job",
    "TrainingError": "deepspark.training.driver.estimator",
    "checkpoint": "deepspark.training.rank.function_state",
    "class_or_instance_load": "deepspark.training.driver.model_io",
    "restore": "deepspark.training.rank.function_state",
    "run": "deepspark.training.driver.function_job",
    "shard": "deepspark.training.rank.shard",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deepspark.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
