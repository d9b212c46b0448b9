"""Where a trial's jobs run: a scheduler pool and job group per trial, and the report address."""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["is_classic", "report_host", "trial_scope"]

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
    context = getattr(spark, "sparkContext", None) if is_classic(spark) else None
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


def is_classic(spark: Any) -> bool:
    return not type(spark).__module__.startswith("pyspark.sql.connect")


def report_host(spark: Any) -> tuple[str, str]:
    """(listen on, ranks connect to): loopback for local masters, else every interface."""
    from deepspark.training.driver.stage import is_loopback_master
    from deepspark.training.rank.rendezvous import local_ip

    if is_loopback_master(spark):
        return "127.0.0.1", "127.0.0.1"
    return "0.0.0.0", local_ip()
