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

__all__ = ["ColumnOptions", "LoopOptions", "RecoveryOptions", "StepOptions"]


@dataclass(frozen=True)
class ColumnOptions:
    """Per column: the shape of an array column, tensor dtypes, decoders of binary/strings."""

    feature_shapes: dict[str, Sequence[int]] | None = None
    feature_dtypes: dict[str, str] | None = None
    label_dtypes: dict[str, str] | None = None
    decoders: dict[str, Callable[[Any], Any]] | None = None
    allow_non_finite: bool = False  # fit: train on NaN / inf instead of refusing them


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
        from deepspark.context.topology import master_of
        from deepspark.training.driver.checks import check_checkpoint_dir, check_positive

        check_positive("checkpoint_every", self.checkpoint_every)
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures!r}: give 0 or more")
        if self.checkpoint_dir is None:
            if self.max_failures > 0:
                if not master_of(spark).is_local:
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


@dataclass(frozen=True)
class LoopOptions:
    """How far a fit trains and what each step does besides forward and backward.

    Checked on the driver by `check`, before any job; `spec_values` are the `TrainSpec`
    fields they become.
    """

    max_steps: int | None = None
    steps_per_epoch: int | None = None
    validate_every_steps: int | None = None
    checkpoint_every_steps: int | None = None
    accumulate_steps: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"

    def check(self, *, has_validation: bool, has_checkpoints: bool, use_gpu: bool) -> None:
        from deepspark.training.driver.checks import check_positive
        from deepspark.training.rank.step import PRECISIONS

        for name in ("max_steps", "steps_per_epoch", "validate_every_steps"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.checkpoint_every_steps is not None:
            check_positive("checkpoint_every_steps", self.checkpoint_every_steps)
        check_positive("accumulate_steps", self.accumulate_steps)
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, (int, float)) and self.clip_grad_norm > 0
        ):
            raise ValueError(f"clip_grad_norm={self.clip_grad_norm!r}: give a positive number")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and not use_gpu:
            raise ValueError(
                'precision="fp16" needs use_gpu=True (its gradient scaler is for CUDA); '
                'on CPU use precision="bf16"'
            )
        if self.validate_every_steps is not None and not has_validation:
            raise ValueError(
                "validate_every_steps needs validation_data= (the rows to validate on)"
            )
        if self.checkpoint_every_steps is not None and not has_checkpoints:
            raise ValueError(
                "checkpoint_every_steps needs checkpoint_dir= (or max_failures > 0 on a local "
                "master, which keeps checkpoints in a private directory)"
            )

    def spec_values(self) -> dict[str, Any]:
        values = {
            "max_steps": self.max_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "validate_every_steps": self.validate_every_steps,
            "checkpoint_every_steps": self.checkpoint_every_steps,
            "accumulate_steps": self.accumulate_steps,
            "clip_grad_norm": self.clip_grad_norm,
            "precision": self.precision,
        }
        if self.checkpoint_every_steps is not None:
            # a resume mid-epoch replays the epoch's order, which a streamed epoch lacks
            values["stream_first_epoch"] = False
        return values


@dataclass(frozen=True)
class StepOptions:
    """What an estimator's ranks run per batch besides the model: the user's own train and
    evaluation steps, a collate hook, and when the schedulers step."""

    train_step: Callable[..., Any] | None = None
    eval_step: Callable[..., Any] | None = None
    collate_fn: Callable[[Any, Any], Any] | None = None
    scheduler_interval: str = "epoch"
    scheduler_monitor: str | None = None

    def check(self) -> None:
        for name in ("train_step", "eval_step", "collate_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}= must be a function, got {type(value).__name__}")
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f'scheduler_interval={self.scheduler_interval!r}: use "epoch" or "step"'
            )

    def check_trainable(self, loss: Any, optimizer: Any) -> None:
        """Refuse a fit the estimator cannot run: no loss (an inference estimator) or no
        optimizer, unless a custom train_step does without them."""
        if self.train_step is None and loss is None:
            raise ValueError(
                "this estimator has no loss: it was built for inference (predict, evaluate). "
                "To train, build it with Estimator.from_torch(model, optimizer=..., loss=...)"
            )
        if optimizer is None:
            raise ValueError(
                "fit needs an optimizer: Estimator.from_torch(model, optimizer=lambda params: "
                "torch.optim.Adam(params), ...)"
            )

    def policy(self, step_policy: str | None) -> str:
        """The fit's step policy: ``"pad"`` by default, ``"wrap"`` with a custom train_step
        (whose ranks must all have rows at every step: it cannot be given an empty batch)."""
        if self.train_step is None:
            return step_policy or "pad"
        if step_policy == "pad":
            raise ValueError(
                'step_policy="pad" cannot run a custom train_step (a rank would get steps with '
                'no rows); use "wrap" (the default with train_step) or "drop"'
            )
        return step_policy or "wrap"

    def spec_values(self) -> dict[str, Any]:
        from deepspark.training.driver.checks import pickled

        def blob(name: str) -> bytes | None:
            value = getattr(self, name)
            return None if value is None else pickled(name, value)

        return {
            "train_step_blob": blob("train_step"),
            "eval_step_blob": blob("eval_step"),
            "collate_blob": blob("collate_fn"),
            "scheduler_interval": self.scheduler_interval,
            "scheduler_monitor": self.scheduler_monitor,
        }
