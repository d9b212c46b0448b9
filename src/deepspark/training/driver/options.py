"""Groups of `fit` arguments that travel together: how columns become tensors, and recovery.

Driver side. `Estimator.fit` keeps its flat keyword arguments (the public names); inside, they
become these small objects so that each step of a fit takes one argument, not five.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["ColumnOptions", "RecoveryOptions"]


@dataclass(frozen=True)
class ColumnOptions:
    """Per column: the shape of an array column, tensor dtypes, decoders of binary/strings."""

    feature_shapes: dict[str, Sequence[int]] | None = None
    feature_dtypes: dict[str, str] | None = None
    label_dtypes: dict[str, str] | None = None
    decoders: dict[str, Callable[[Any], Any]] | None = None


@dataclass
class RecoveryOptions:
    """Checkpoints and retries of one `fit`.

    `resume` asks a new `fit` to continue the run whose checkpoints are in `checkpoint_dir`;
    without it a directory holding checkpoints is refused, so a second `fit` never silently
    continues (or skips) an old run. Retries inside one `fit` (`max_failures`) always resume.
    """

    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = False
    max_failures: int = 0
    own_directory: str | None = field(default=None, init=False)

    def prepare(self, spark: SparkSession) -> RecoveryOptions:
        """Check the options on the driver; give retries without a directory a private one."""
        from deepspark.training.driver.checks import check_checkpoint_dir, check_positive
        from deepspark.training.driver.stage import is_loopback_master

        check_positive("checkpoint_every", self.checkpoint_every)
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures!r}: give 0 or more")
        if self.checkpoint_dir is None:
            if self.max_failures > 0:
                if not is_loopback_master(spark):
                    raise ValueError(
                        "max_failures > 0 needs checkpoint_dir= (a URL every executor can "
                        "reach, e.g. hdfs:// or s3a://) so a re-run can resume"
                    )
                self.own_directory = tempfile.mkdtemp(prefix="deepspark-ckpt-")
                self.checkpoint_dir = self.own_directory
            return self
        check_checkpoint_dir(self.checkpoint_dir)
        if not self.resume:
            self._refuse_another_run()
        return self

    def _refuse_another_run(self) -> None:
        from deepspark.training.rank.checkpoint import latest_checkpoint

        found = latest_checkpoint(self.checkpoint_dir)
        if found is not None:
            raise ValueError(
                f"checkpoint_dir={self.checkpoint_dir!r} already holds checkpoints of another "
                f"run (latest: epoch {found.epoch}). Pass resume=True to continue that run, or "
                "give a new (or emptied) checkpoint_dir to start a new one"
            )

    def release(self) -> None:
        """Remove the private directory `prepare` made, if any."""
        if self.own_directory is not None:
            shutil.rmtree(self.own_directory, ignore_errors=True)
            self.own_directory = None
