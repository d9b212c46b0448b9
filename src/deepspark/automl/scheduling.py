"""Where a trial's jobs run: a scheduler pool and job group per trial."""

from __future__ import annotations

import contextlib
from typing import Any

from deepspark.context.topology import is_connect

__all__ = ["trial_scope"]


@contextlib.contextmanager
def trial_scope(spark: Any, number: int):
    """The trial's jobs run in a scheduler pool and job group of their own (classic Spark)."""
    context = None if is_connect(spark) else getattr(spark, "sparkContext", None)
    if context is None:
        yield
        return
    pool = f"deepspark-trial-{number}"
    context.setLocalProperty("spark.scheduler.pool", pool)
    context.setJobGroup(pool, f"deepspark AutoML trial {number}", interruptOnCancel=True)
    try:
        yield
    finally:
        context.setLocalProperty("spark.scheduler.pool", None)
        context.setLocalProperty("spark.jobGroup.id", None)
        context.setLocalProperty("spark.job.description", None)
