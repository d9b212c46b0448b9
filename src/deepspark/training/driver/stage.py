"""The Spark layer of training: one barrier stage over `mapInArrow`, and its results.

The driver-side modules alone touch pyspark; the ranks' work is `rank.run.run_rank`.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.training.job_spec import RESULT_SCHEMA, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["available_task_slots", "is_connect", "is_loopback_master", "run_barrier_stage"]


def is_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _master(spark: SparkSession) -> str:
    if is_connect(spark):
        return spark.conf.get("spark.master", "") or ""
    return spark.sparkContext.master


def is_loopback_master(spark: SparkSession) -> bool:
    """Local modes run every rank on this machine: rendezvous on loopback only."""
    return _master(spark).startswith("local")


def available_task_slots(spark: SparkSession) -> int:
    """How many tasks can run at once: the most ranks one barrier stage can hold."""
    master = _master(spark)
    task_cpus = int(spark.conf.get("spark.task.cpus", "1") or 1)
    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if local:
        threads = local.group(1)
        if threads is None:
            cores = 1
        elif threads == "*":
            cores = os.cpu_count() or 1
        else:
            cores = int(threads)
        return max(1, cores // task_cpus)
    cluster = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if cluster:
        return int(cluster.group(1)) * int(cluster.group(2)) // task_cpus
    if not is_connect(spark):
        tracker = spark.sparkContext._jsc.sc()
        executors = tracker.getExecutorMemoryStatus().size() - 1  # minus the driver
        cores = int(spark.conf.get("spark.executor.cores", "1") or 1)
        if executors > 0:
            return executors * cores // task_cpus
        return max(1, spark.sparkContext.defaultParallelism // task_cpus)
    parallelism = spark.conf.get("spark.default.parallelism", None)
    return max(1, int(parallelism) // task_cpus) if parallelism else 1


def run_barrier_stage(df: DataFrame, spec: TrainSpec) -> pa.Table:
    """Run `spec` as one barrier stage over `df` (already `spec.world_size` partitions)."""

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
            all_gather=lambda message: list(task.allGather(message)),
            spill_dir=spill_dir,
            task_cpus=int(task.cpus()),
            gpu_ids=gpus,
        )
        yield from run_rank(spec, batches, context)

    result = df.mapInArrow(train_task, RESULT_SCHEMA, barrier=True)
    return result.toArrow()
