"""The Spark layer of training: one barrier stage over `mapInArrow`, and its results.

The driver-side modules alone touch pyspark; the ranks' work is `rank.run.run_rank`.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deepspark.training.job_spec import RESULT_SCHEMA, RankLoop, TrainSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "available_task_slots",
    "free_task_slots",
    "is_connect",
    "is_loopback_master",
    "master_url",
    "run_barrier_stage",
]


def is_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def master_url(spark: SparkSession) -> str:
    """The master of the application behind `spark` (a Connect server's own master)."""
    if is_connect(spark):
        return spark.conf.get("spark.master", "") or ""
    return spark.sparkContext.master


def is_loopback_master(spark: SparkSession) -> bool:
    """Local modes run every rank on this machine: rendezvous on loopback only."""
    return master_url(spark).startswith("local")


def available_task_slots(spark: SparkSession) -> int:
    """How many tasks can run at once: the most ranks one barrier stage can hold.

    Executors times the tasks each runs at once, limited by ``spark.task.cpus`` and, where
    tasks ask for GPUs, by ``spark.task.resource.gpu.amount``. Over Spark Connect the server's
    master and executor confs say it, or a probe job that reports the executors it ran on.
    """
    executors, cores = _executor_layout(spark)
    task_cpus = _conf_float(spark, "spark.task.cpus") or 1.0
    per_executor = int(cores // task_cpus)
    task_gpus = _conf_float(spark, "spark.task.resource.gpu.amount")
    if task_gpus:
        executor_gpus = _conf_float(spark, "spark.executor.resource.gpu.amount")
        if master_url(spark).startswith("local"):  # the executor is the driver
            executor_gpus = executor_gpus or _conf_float(spark, "spark.driver.resource.gpu.amount")
        if executor_gpus:
            per_executor = min(per_executor, int(executor_gpus / task_gpus + 1e-9))
    return max(1, executors * per_executor)


def free_task_slots(spark: SparkSession) -> tuple[int, dict[str, int]]:
    """``(slots a new barrier stage can have, {holder: slots held})``.

    `available_task_slots` less what long-running jobs of the session hold
    (`deepspark.context.session.hold_task_slots`: Ray on Spark's worker nodes); may be 0.
    """
    from deepspark.context.session import held_task_slots

    held = held_task_slots()
    return max(0, available_task_slots(spark) - sum(held.values())), held


def _executor_layout(spark: SparkSession) -> tuple[int, int]:
    """``(executors, cores per executor)`` of the application behind `spark`."""
    master = master_url(spark)
    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if local:
        threads = local.group(1)
        if threads is None:
            return 1, 1
        return 1, (os.cpu_count() or 1) if threads == "*" else int(threads)
    cluster = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if cluster:
        return int(cluster.group(1)), int(cluster.group(2))
    cores = int(_conf_float(spark, "spark.executor.cores") or 0)
    if not is_connect(spark):
        tracker = spark.sparkContext._jsc.sc()
        executors = tracker.getExecutorMemoryStatus().size() - 1  # minus the driver
        if executors > 0:
            return executors, cores or 1
        return 1, spark.sparkContext.defaultParallelism
    dynamic = _conf(spark, "spark.dynamicAllocation.enabled").lower()
    instances = int(_conf_float(spark, "spark.executor.instances") or 0)
    if instances and cores and dynamic != "true":
        return instances, cores
    from deepspark.context.workers import check_workers

    # The probe runs one task per core the server's scheduler knows; it reports the
    # executors (host and working directory) those tasks ran on.
    survey = check_workers(spark, survey=True)
    assert survey is not None
    executors = instances or survey.executors
    return executors, cores or max(1, survey.tasks // survey.executors)


def _conf(spark: SparkSession, key: str) -> str:
    try:
        return spark.conf.get(key, None) or ""
    except Exception:  # a Connect server may refuse to show a conf
        return ""


def _conf_float(spark: SparkSession, key: str) -> float:
    try:
        return float(_conf(spark, key) or 0)
    except ValueError:
        return 0.0


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
    return result.toArrow()
