"""The Spark layer of training: one barrier stage over `mapInArrow`, and its results.

The driver-side modules alone touch pyspark; the ranks' work is `rank.run.run_rank`.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import pyarrow as pa

from deepspark.context.spark_versions import collect_arrow
from deepspark.training.job_spec import RESULT_SCHEMA, RankLoop, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["run_barrier_stage"]


def run_barrier_stage(df: DataFrame, spec: TrainSpec, loop: RankLoop = RankLoop.TORCH) -> pa.Table:
    """Run `spec` as one barrier stage over `df` (already `spec.world_size` partitions).

    Each task runs the rank `loop`: `deepspark.training.rank.run.run_rank` (torch) or
    `deepspark.training.rank._tf_rank.run_tf_rank` (TensorFlow), rank modules without pyspark.
    """

    def train_task(batches):
        # Runs in the Python worker of each barrier task; imports happen there.
        from pyspark import BarrierTaskContext

        from deepspark.training.rank.run import RankContext, run_rank

        if loop is RankLoop.TENSORFLOW:
            from deepspark.training.rank._tf_rank import run_tf_rank as rank_entry
        elif loop is RankLoop.FUNCTION:
            from deepspark.training.rank._function_rank import run_function_rank as rank_entry
        else:
            rank_entry = run_rank

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
        yield from rank_entry(spec, batches, context)

    result = df.mapInArrow(train_task, RESULT_SCHEMA, barrier=True)
    return collect_arrow(result)
