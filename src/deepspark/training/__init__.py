"""Distributed PyTorch training inside Spark: `Estimator` (driver), `run` (a user's own function
on N ranks) and the rank-side engine."""

from deepspark.context.workers import warm_modules
from deepspark.training.driver.estimator import Estimator, TrainingError
from deepspark.training.driver.function_job import RunError, run
from deepspark.training.rank.function_state import checkpoint, restore
from deepspark.training.rank.shard import ShardDataset, shard

# What a rank imports: init_context's warm-up imports it in the workers ahead of the first fit
# (the metrics, with torchmetrics, also on the driver, whose checks update every metric once).
warm_modules("deepspark.training.rank.run", "deepspark.training.rank.loop")
warm_modules("deepspark.training.rank.metrics", driver=True)

__all__ = [
    "Estimator",
    "RunError",
    "ShardDataset",
    "TrainingError",
    "checkpoint",
    "restore",
    "run",
    "shard",
]
