"""Columnar data feed: DataFrame partitions become torch batches inside the Spark tasks.

Worker-side names (every module here but `validate` and `cache`) import no pyspark;
`resolve_specs` is the driver-side check that turns column names into `TensorSpec` objects
before any job starts, and `cache.CachedFrame` is what `deepspark.cache` returns (both import
pyspark only when called).
"""

from __future__ import annotations

from deepspark.data.batching import Batch, iter_batches
from deepspark.data.chunks import rows_from_chunks
from deepspark.data.columns import ColumnKind, FeedError, TensorSpec, batch_to_tensors
from deepspark.data.dataset import ArrowPartitionDataset
from deepspark.data.plan import StepPlan, StepPolicy, plan_steps
from deepspark.data.spec import assemble
from deepspark.data.spill import PartitionSpill, spill_directory

__all__ = [
    "ArrowPartitionDataset",
    "Batch",
    "CachedFrame",
    "ColumnKind",
    "FeedError",
    "PartitionSpill",
    "StepPlan",
    "StepPolicy",
    "TensorSpec",
    "assemble",
    "batch_to_tensors",
    "iter_batches",
    "plan_steps",
    "resolve_specs",
    "rows_from_chunks",
    "spill_directory",
]

_DRIVER_SIDE = {
    "resolve_specs": "deepspark.data.validate",
    "CachedFrame": "deepspark.data.cache",
}


def __getattr__(name: str):
    # The driver-side names live apart so that worker code never loads them.
    if name in _DRIVER_SIDE:
        import importlib

        return getattr(importlib.import_module(_DRIVER_SIDE[name]), name)
    raise AttributeError(f"module 'deepspark.data' has no attribute {name!r}")
