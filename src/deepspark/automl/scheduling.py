"""Where a trial's jobs run: a scheduler pool and job group per trial."""

from __future__ import annotations

import contextlib
from typing import Any

from deepspark.context.topology import is_connect

__all__ = ["trial_scope"]

# The thread-local Spark properties a trial sets (setJobGroup sets the last three).
_TRIAL_PROPERTIES = (
    "spark.scheduler.pool",
    "spark.jobGroup.id",
    "spark.job.description",
    "spark.job.interruptOnCancel",
)


@contextlib.contextmanager
def trial_scope(spark: Any, number: int):
    """The trial's jobs run in a scheduler pool and job group of their own (classic Spark)."""
    context = None if is_connect(spark) else getattr(spark, "sparkContext", None)
    if context is None:
        yield
        return
    # The thread's own values come back afterwards: a job group or pool the user set stays.
    before = {key: context.getLocalProperty(key) for key in _TRIAL_PROPERTIES}
    pool = f"deepspark-trial-{number}"
    context.setLocalProperty("spark.scheduler.pool", pool)
    context.setJobGroup(pool, f"deepspark AutoML trial {number}", interruptOnCancel=True)
    try:
        yield
    finally:
        for key, value in before.items():
            context.setLocalProperty(key, value)
