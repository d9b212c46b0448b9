"""The options of a fit, declared once: what `deepspark.training.engine` runs a job with.

Four small groups, each a frozen dataclass: `DataOptions` (how the rows become batches),
`LoopOptions` (how far and how each step trains), `RecoveryOptions` (checkpoints and re-runs)
and `RunOptions` (how many ranks, how long they wait, the progress bar); `FitOptions` holds one
of each and the callbacks. `Estimator.fit` and the other front doors take the same names as
flat keyword arguments (``epochs=5, checkpoint_dir=...``); `FitOptions.from_keywords` sorts
them into the groups, so a name means one thing everywhere.

Spark-free and torch-free: the values travel to the ranks inside the job's spec. The checks
here need nothing but the values; those that need the session or the data (a checkpoint
directory's contents, the worker count) run in the engine before the job starts.

Examples
--------
>>> from deepspark.training.options import FitOptions
>>> options = FitOptions.from_keywords(feature_cols=["x"], label_cols="y", epochs=3,
...                                    checkpoint_dir="/tmp/ckpt", num_workers=2)
>>> options.loop.epochs, options.recovery.checkpoint_dir, options.run.num_workers
(3, '/tmp/ckpt', 2)
>>> options.data.batch_size
32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRECISIONS",
    "STEP_POLICIES",
    "DataOptions",
    "EvaluateOptions",
    "FitOptions",
    "LoopOptions",
    "RecoveryOptions",
    "RunOptions",
    "StepOptions",
    "check_loss",
    "check_positive",
]

PRECISIONS = ("fp32", "bf16", "fp16")
STEP_POLICIES = ("pad", "drop", "wrap")

ColumnsArg = str | Sequence[Any] | dict[str, Any]


def check_positive(name: str, value: Any) -> None:
    """Refuse anything but a positive integer for the argument `name`.

    Examples
    --------
    >>> check_positive("epochs", 0)
    Traceback (most recent call last):
    ...
    ValueError: epochs=0: give a positive integer
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive integer")


def check_loss(loss: Any) -> None:
    """`loss` is callable as ``loss(outputs, labels)``: a function or a loss instance."""
    if not callable(loss):
        raise TypeError(
            f"loss must be callable as loss(outputs, labels), e.g. torch.nn.CrossEntropyLoss(); "
            f"got {type(loss).__name__} ({loss!r:.60})"
        )
    if isinstance(loss, type):
        raise TypeError(
            f"loss is the class {loss.__name__}; pass an instance, e.g. {loss.__name__}()"
        )


@dataclass(frozen=True)
class DataOptions:
    """How the job's rows become tensors and batches.

    Parameters
    ----------
    feature_cols, label_cols : str or list, optional
        Columns; a nested list of scalar columns stacks them into one tensor. A data creator
        (a function ``(config, batch_size) -> DataLoader``) needs neither.
    batch_size : int
        The global batch size, split over the ranks.
    feature_shapes, feature_dtypes, label_dtypes, decoders : dict, optional
        Per column: the shape of an array column, tensor dtypes, and decode functions for
        binary or string columns.
    step_policy : {"pad", "drop", "wrap"}, optional
        How ranks with fewer rows keep in step (see docs/data.md); default ``"pad"``, or
        ``"wrap"`` with a custom ``train_step``.
    stream_first_epoch : bool
        Train the first epoch while the partitions arrive (the first step waits for one batch
        of rows, not the whole partition); ``False`` spills the partition first, so the first
        epoch is shuffled like the others.
    """

    feature_cols: ColumnsArg | None = None
    label_cols: ColumnsArg | None = None
    batch_size: int = 32
    feature_shapes: dict[str, Sequence[int]] | None = None
    feature_dtypes: dict[str, str] | None = None
    label_dtypes: dict[str, str] | None = None
    decoders: dict[str, Callable[[Any], Any]] | None = None
    step_policy: str | None = None
    stream_first_epoch: bool = True

    def check(self) -> None:
        """Refuse values no job can use."""
        check_positive("batch_size", self.batch_size)
        if self.step_policy is not None and self.step_policy not in STEP_POLICIES:
            raise ValueError(
                f"step_policy={self.step_policy!r}: use one of {', '.join(STEP_POLICIES)}"
            )


@dataclass(frozen=True)
class LoopOptions:
    """How far a fit trains and what each step does besides forward and backward.

    Parameters
    ----------
    epochs : int
    seed : int, optional
        Seeds the model's replicas and the per-epoch shuffle (0 when not given).
    max_steps : int, optional
        Stop after this many optimizer-batch steps over the whole fit (mid-epoch if need be);
        ``epochs`` stays an upper bound.
    steps_per_epoch : int, optional
        End each epoch after at most this many steps.
    validate_every_steps : int, optional
        Also validate every N steps (needs validation data); see ``step_history``.
    checkpoint_every_steps : int, optional
        Also checkpoint every N steps; a resumed fit continues mid-epoch (the first epoch is
        then spilled before it starts).
    accumulate_steps : int
        Apply the gradients of this many batches at once (the loss is their mean).
    clip_grad_norm : float, optional
        Clip the gradients' total norm before each optimizer step.
    precision : {"fp32", "bf16", "fp16"}
        ``"bf16"`` runs forward and loss under autocast; ``"fp16"`` also scales the gradients
        (GPU only).
    """

    epochs: int = 1
    seed: int | None = None
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    validate_every_steps: int | None = None
    checkpoint_every_steps: int | None = None
    accumulate_steps: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"

    def check(self) -> None:
        """Refuse values no loop can run."""
        check_positive("epochs", self.epochs)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed={self.seed!r}: give an integer")
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

    def check_with(self, *, has_validation: bool, has_checkpoints: bool, use_gpu: bool) -> None:
        """Refuse options the job's data, checkpoints or device cannot serve."""
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


@dataclass(frozen=True)
class RecoveryOptions:
    """Checkpoints and re-runs of one fit.

    Parameters
    ----------
    checkpoint_dir : str, optional
        fsspec URL where rank 0 writes a checkpoint every `checkpoint_every` epochs.
    checkpoint_every : int
    resume : bool
        Continue the run whose checkpoints are in `checkpoint_dir`. Without it a directory
        that already holds checkpoints is refused, so a second fit never silently continues
        (or skips) an old run.
    max_failures : int
        How many times a failed job is re-run; a re-run always resumes from the latest
        checkpoint of this fit (on a local master without `checkpoint_dir`, from a private
        directory removed afterwards).
    """

    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = False
    max_failures: int = 0

    def check(self) -> None:
        """Refuse values no recovery can use."""
        check_positive("checkpoint_every", self.checkpoint_every)
        if (
            isinstance(self.max_failures, bool)
            or not isinstance(self.max_failures, int)
            or self.max_failures < 0
        ):
            raise ValueError(f"max_failures={self.max_failures!r}: give 0 or more")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the job's ranks run.

    Parameters
    ----------
    num_workers : int, optional
        Ranks (Spark tasks); default: every free task slot.
    collective_timeout_s : float
        Longest wait of any rank on the others before the job fails.
    progress : bool
        Show a live progress bar on the driver.
    """

    num_workers: int | None = None
    collective_timeout_s: float = 600.0
    progress: bool = True

    def check(self) -> None:
        """Refuse values no job can run with."""
        if self.num_workers is not None:
            check_positive("num_workers", self.num_workers)
        if not isinstance(self.collective_timeout_s, (int, float)) or not (
            self.collective_timeout_s > 0
        ):
            raise ValueError(
                f"collective_timeout_s={self.collective_timeout_s!r}: give a positive number "
                "of seconds"
            )


@dataclass(frozen=True)
class StepOptions:
    """What an estimator's ranks run per batch besides the model: the user's own train and
    evaluation steps, a collate hook, and when the schedulers step (see
    ``Estimator.from_torch``)."""

    train_step: Callable[..., Any] | None = None
    eval_step: Callable[..., Any] | None = None
    collate_fn: Callable[[Any, Any], Any] | None = None
    scheduler_interval: str = "epoch"
    scheduler_monitor: str | None = None

    def check(self) -> None:
        """Refuse steps that are not functions and unknown scheduler intervals."""
        for name in ("train_step", "eval_step", "collate_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}= must be a function, got {type(value).__name__}")
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f'scheduler_interval={self.scheduler_interval!r}: use "epoch" or "step"'
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


def _grouped(
    groups: dict[str, type], base: Any, keywords: dict[str, Any], call: str
) -> dict[str, Any]:
    """`base`'s groups with the flat `keywords` applied, each to the group that declares it."""
    known = {
        item.name: group for group, kind in groups.items() for item in dataclasses.fields(kind)
    }
    changes: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for name, value in keywords.items():
        if value is None and name in _NOT_GIVEN_WHEN_NONE:
            continue
        if name not in known:
            raise TypeError(
                f"{call}() got an unexpected keyword argument {name!r}; its options are "
                f"{', '.join(sorted(known))}"
            )
        changes[known[name]][name] = value
    return {
        group: dataclasses.replace(getattr(base, group), **values)
        for group, values in changes.items()
    }


# the columns of fit(df, feature_cols, label_cols): None (their default) keeps what `base` says
_NOT_GIVEN_WHEN_NONE = ("feature_cols", "label_cols")

_FIT_GROUPS = {
    "data": DataOptions,
    "loop": LoopOptions,
    "recovery": RecoveryOptions,
    "run": RunOptions,
}


@dataclass(frozen=True)
class FitOptions:
    """Every option of a fit, in its group.

    Parameters
    ----------
    data : DataOptions
    loop : LoopOptions
    recovery : RecoveryOptions
    run : RunOptions
    callbacks : tuple of deepspark.training.callbacks.Callback
        Their driver hooks run around the job, their worker hooks on the ranks.
    """

    data: DataOptions = field(default_factory=DataOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    run: RunOptions = field(default_factory=RunOptions)
    callbacks: tuple[Any, ...] = ()

    @classmethod
    def from_keywords(cls, base: FitOptions | None = None, /, **keywords: Any) -> FitOptions:
        """`base` (default: every default) with the flat keyword arguments of ``fit`` applied.

        ``callbacks`` is taken too (a list becomes a tuple). ``feature_cols``, ``label_cols``
        and ``callbacks`` given as None keep `base`'s. An unknown name raises ``TypeError``
        naming the known ones.
        """
        base = base or cls()
        callbacks = keywords.pop("callbacks", None)
        callbacks = base.callbacks if callbacks is None else tuple(callbacks)
        return cls(**_grouped(_FIT_GROUPS, base, keywords, "fit"), callbacks=callbacks)

    def keywords(self) -> dict[str, Any]:
        """The options as the flat keyword arguments of ``fit`` (without the callbacks)."""
        return {
            item.name: getattr(getattr(self, group), item.name)
            for group, kind in _FIT_GROUPS.items()
            for item in dataclasses.fields(kind)
        }

    def check(self) -> None:
        """Refuse values no fit can run (before any data is read)."""
        self.data.check()
        self.loop.check()
        self.recovery.check()
        self.run.check()


@dataclass(frozen=True)
class EvaluateOptions:
    """The options of an evaluation: how rows become batches (``batch_size`` 256 by default)
    and where the ranks run (no progress bar by default)."""

    data: DataOptions = field(default_factory=lambda: DataOptions(batch_size=256))
    run: RunOptions = field(default_factory=lambda: RunOptions(progress=False))

    @classmethod
    def from_keywords(
        cls, base: EvaluateOptions | None = None, /, **keywords: Any
    ) -> EvaluateOptions:
        """`base` with the flat keyword arguments of ``evaluate`` applied."""
        groups = {"data": DataOptions, "run": RunOptions}
        return cls(**_grouped(groups, base or cls(), keywords, "evaluate"))

    def check(self) -> None:
        """Refuse values no evaluation can run."""
        self.data.check()
        self.run.check()
