"""The failure-retry loop re-runs only failures that a re-run can fix."""

from __future__ import annotations

import threading

import pytest

import deepspark as ds
from deepspark.training.driver.jobs import retry_can_help, run_job
from deepspark.training.job_spec import JobKind, TrainSpec


def _spec(world_size: int) -> TrainSpec:
    return TrainSpec(
        kind=JobKind.FIT,
        model_blob=b"",
        loss_blob=None,
        optimizer_blob=None,
        scheduler_blob=None,
        metrics_blob=b"",
        callbacks_blob=None,
        config={},
        features=(),
        labels=(),
        world_size=world_size,
        epochs=1,
        batch_size=8,
    )


def test_an_error_of_the_drivers_own_code_is_not_retried(spark):
    # The rank entry holds a lock, which does not pickle: Spark's driver code raises while it
    # builds the stage, before any task runs, and raises the same on every re-run.
    lock = threading.Lock()

    def rank_entry(spec, batches, context):
        with lock:
            yield from ()

    data = spark.range(0, 8, 1, 2)
    with pytest.raises(ds.TrainingError, match=r"after 1 attempt\(s\) \(not retried") as failure:
        run_job(spark, data, _spec(2), max_failures=2, progress=False, rank_entry=rank_entry)
    assert len(failure.value.causes) == 1
    assert not retry_can_help(failure.value.__cause__)


def test_a_failure_inside_the_job_is_retried_up_to_max_failures(spark):
    def rank_entry(spec, batches, context):
        raise RuntimeError(f"rank {context.rank} lost its input (attempt {spec.attempt})")
        yield  # a generator, as rank entries are

    data = spark.range(0, 8, 1, 2)
    with pytest.raises(ds.TrainingError, match=r"after 2 attempt\(s\):") as failure:
        run_job(spark, data, _spec(2), max_failures=1, progress=False, rank_entry=rank_entry)
    assert len(failure.value.causes) == 2
    assert "lost its input (attempt 1)" in failure.value.causes[0]
    assert "lost its input (attempt 2)" in failure.value.causes[1]
