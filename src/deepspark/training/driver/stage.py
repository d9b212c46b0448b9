"""The Spark layer of training: one barrier stage over `mapInArrow`, and its results.

The driver-side modules alone touch pyspark; the ranks' work is `rank.run.run_rank`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.context.spark_versions import collect_arrow
from deepspark.training.job_spec import RESULT_SCHEMA, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

# What a barrier task runs: (spec, the task's Arrow batches, RankContext) -> result batches.
RankEntry = Callable[[TrainSpec, Iterable[pa.RecordBatch], Any], Iterator[pa.RecordBatch]]

__all__ = ["run_barrier_stage"]


def run_barrier_stage(
    df: DataFrame, spec: TrainSpec, rank_entry: RankEntry | None = None
) -> pa.Table:
    """Run `spec` as one barrier stage over `df` (already `spec.world_size` partitions).

    Each task runs `rank_entry(spec, batches, context)`, a module-level function of a rank
    module (no pyspark): `deepspark.training.rank.run.run_rank` by default.
    """

    def train_task(batches):
        # Runs in the Python worker of each barrier task; imports happen there.
        from pyspark import BarrierTaskContext

        from deepspark.training.rank.run import RankContext, run_rank

        task = BarrierTaskContext.get()
        if task.attemptNumber() > 0:
            # The driver re-runs failed jobs itself (max_failures, from the latest checkpoint);
            # a retry Spark starts on its own would train without that bookkeeping.
            raise RuntimeError(
                "deepspark: Spark re-ran a training task after a failure; retries are the "
                "driver's job (fit(max_failures=...)), so this attempt stops"
            )
        resources = task.resources()
        gpus = tuple(resources["gpu"].addresses) if "gpu" in resources else ()
        local_dirs = os.environ.get("SPARK_LOCAL_DIRS", "")
        spill_dir = local_dirs.split(",")[0] if local_dirs else tempfile.gettempdir()
        context = RankContext(
            rank=task.partitionId(),
            spill_dir=spill_dir,
            task_cpus=int(task.cpus()),
            gpu_ids=gpus,
        )
        yield from (rank_entry or run_rank)(spec, batches, context)

    result = df.mapInArrow(train_task, RESULT_SCHEMA, barrier=True)
    return collect_arrow(result)
