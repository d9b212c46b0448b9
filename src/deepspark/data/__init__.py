"""Columnar data feed: DataFrame partitions become torch batches inside the Spark tasks.

Worker-side names (every module here but `validate`) import no pyspark; `resolve_specs` is the
driver-side check that turns column names into `TensorSpec` objects before any job starts (it
imports pyspark only when called).
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
    "resolve_specs",
    "spill_directory",
]


def __getattr__(name: str):
    # The driver-side check lives apart so that worker code never loads it.
    if name == "resolve_specs":
        from deepspark.data.validate import resolve_specs

        return resolve_specs
    raise AttributeError(f"module 'deepspark.data' has no attribute {name!r}")
