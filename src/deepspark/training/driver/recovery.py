"""Recovery of one fit on the driver: its checkpoint directory, checked before the job.

`prepared_recovery` checks `RecoveryOptions` against the session and the directory: a new fit
refuses a directory that holds another run's checkpoints (unless ``resume``), and re-runs
without a directory get a private one on a local master, removed when the fit ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from deepspark.training.options import RecoveryOptions

__all__ = ["prepared_recovery"]


@contextlib.contextmanager
def prepared_recovery(spark: SparkSession, options: RecoveryOptions) -> Iterator[RecoveryOptions]:
    """`options` as the job runs with them: checked, with a private directory if need be."""
    from deepspark.training.driver.checks import check_checkpoint_dir
    from deepspark.training.driver.stage import is_loopback_master

    own_directory = None
    if options.checkpoint_dir is None:
        if options.max_failures > 0:
            if not is_loopback_master(spark):
                raise ValueError(
                    "max_failures > 0 needs checkpoint_dir= (a URL every executor can "
                    "reach, e.g. hdfs:// or s3a://) so a re-run can resume"
                )
            own_directory = tempfile.mkdtemp(prefix="deepspark-ckpt-")
            options = dataclasses.replace(options, checkpoint_dir=own_directory)
    else:
        check_checkpoint_dir(options.checkpoint_dir)
        if not options.resume:
            _refuse_another_run(options.checkpoint_dir)
    try:
        yield options
    finally:
        if own_directory is not None:
            shutil.rmtree(own_directory, ignore_errors=True)


def _refuse_another_run(checkpoint_dir: str) -> None:
    from deepspark.training.rank.checkpoint import latest_checkpoint

    found = latest_checkpoint(checkpoint_dir)
    if found is not None:
        raise ValueError(
            f"checkpoint_dir={checkpoint_dir!r} already holds checkpoints of another "
            f"run (latest: epoch {found.epoch}). Pass resume=True to continue that run, or "
            "give a new (or emptied) checkpoint_dir to start a new one"
        )
