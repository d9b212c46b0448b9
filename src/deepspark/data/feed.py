"""The worker-side feed: what a Spark task calls to turn its partition into torch batches.

Worker side: nothing here imports pyspark, so the same code runs (and is tested) on plain
pyarrow batches, in spawned processes and on machines without Spark.

* `iter_batches` - one ordered pass straight from the task's input (inference).
* `PartitionSpill` - spill the input once, then shuffled epochs and ordered passes (training
  and validation).
* `plan_steps` / `StepPlan` / `StepPolicy` - the same number of steps on every rank.
* `ArrowPartitionDataset` - the same batches behind a torch ``IterableDataset``.
"""

from __future__ import annotations

from deepspark.data.batching import Batch, iter_batches
from deepspark.data.columns import ColumnKind, FeedError, TensorSpec, batch_to_tensors
from deepspark.data.dataset import ArrowPartitionDataset
from deepspark.data.plan import StepPlan, StepPolicy, plan_steps
from deepspark.data.spill import PartitionSpill, spill_directory

__all__ = [
    "ArrowPartitionDataset",
    "Batch",
    "ColumnKind",
    "FeedError",
    "PartitionSpill",
    "StepPlan",
    "StepPolicy",
    "TensorSpec",
    "batch_to_tensors",
    "iter_batches",
    "plan_steps",
    "spill_directory",
]
