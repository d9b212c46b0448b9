"""The failure-retry loop re-runs only failures that a re-run can fix."""

from __future__ import annotations

import threading

import pytest

import deepspark as ds
from deepspark.training.driver.jobs import retry_can_help


def test_an_error_of_the_drivers_own_code_is_not_retried(spark):
    # The function holds a lock, which does not pickle: the driver's own code raises while it
    # builds the stage, before any task runs, and would raise the same on every re-run.
    lock = threading.Lock()

    def train():
        with lock:
            return 1

    # refused on the driver, once, with the fix: no attempt is made, so none is repeated
    with pytest.raises(TypeError, match=r"fn cannot be pickled") as failure:
        ds.run(train, num_workers=2, max_failures=2)
    assert not retry_can_help(failure.value)


@pytest.mark.slow
def test_a_failure_inside_the_job_is_retried_up_to_max_failures(spark):
    def train():
        raise RuntimeError("this rank lost its input")

    with pytest.raises(ds.TrainingError, match=r"after 2 attempt\(s\)") as failure:
        ds.run(train, num_workers=2, max_failures=1)
    assert len(failure.value.causes) == 2
