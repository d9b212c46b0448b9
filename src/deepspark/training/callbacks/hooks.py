"""The callbacks' base class, what a worker hook sees, and how hooks are called.

See :mod:`deepspark.training.callbacks` for where each hook runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DRIVER_HOOKS",
    "WORKER_HOOKS",
    "Callback",
    "CallbackState",
    "call_driver_hook",
    "call_worker_hook",
    "numeric_logs",
    "require",
]

WORKER_HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_batch_end",
    "on_epoch_end",
    "on_train_end",
)
DRIVER_HOOKS = ("on_fit_begin", "on_fit_end")


@dataclass
class CallbackState:
    """What a worker hook sees.

    Attributes
    ----------
    epoch : int
        Current epoch, 0-based.
    step : int
        Step within the epoch, 0-based (at ``on_epoch_end``: the number of steps).
    rank, world_size : int
    logs : dict
        Values for the hook; see the module docstring.
    model : torch.nn.Module, optional
        The rank's model (not the DistributedDataParallel wrapper).
    epochs : int, optional
        Epochs in the whole fit.
    params : dict
        The fit's parameters (``epochs``, ``batch_size``, ``num_workers``, ...), for logging.
    stop_training : bool
        Set it to True in ``on_epoch_end`` to end the fit after this epoch. The decision is
        taken once for all ranks: when any rank's callbacks ask, every rank stops after the
        same epoch (no rank stops alone and leaves the others waiting).

    Examples
    --------
    >>> state = CallbackState(epoch=1, step=0, rank=0, world_size=2, logs={"loss": 0.4})
    >>> state.logs["loss"], state.model is None
    (0.4, True)
    """

    epoch: int
    step: int
    rank: int
    world_size: int
    logs: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    epochs: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stop_training: bool = False


class Callback:
    """Base class: override the hooks you need; all default to doing nothing.

    Set ``rank_zero_only = True`` for a callback that should act once per job rather than on
    every rank (loggers, exporters).

    Examples
    --------
    >>> class PrintLoss(Callback):
    ...     rank_zero_only = True
    ...     def on_epoch_end(self, state):
    ...         print(f"epoch {state.epoch}: {state.logs['train_loss']:.2f}")
    >>> state = CallbackState(epoch=0, step=10, rank=0, world_size=2, logs={"train_loss": 0.5})
    >>> call_worker_hook([PrintLoss()], "on_epoch_end", state)
    epoch 0: 0.50
    """

    rank_zero_only: bool = False

    # --- on the driver ---------------------------------------------------------------------

    def on_fit_begin(self, params: dict[str, Any]) -> None:
        """Driver, before the training job starts; ``params`` are the fit's parameters."""

    def on_fit_end(self, history: list[dict[str, Any]], error: BaseException | None) -> None:
        """Driver, after the fit: ``history`` has one dict per epoch; ``error`` is what ended
        the fit when it failed for good (then raised to the user), else None."""

    # --- on the ranks ----------------------------------------------------------------------

    def on_train_begin(self, state: CallbackState) -> None:
        """Rank, once before the first epoch (of this attempt: after a resume too)."""

    def on_epoch_begin(self, state: CallbackState) -> None:
        """Rank, at the start of each epoch."""

    def on_batch_end(self, state: CallbackState) -> None:
        """Rank, after each optimizer step; ``state.logs["loss"]`` is the batch loss."""

    def on_epoch_end(self, state: CallbackState) -> None:
        """Rank, after each epoch with the reduced metrics in ``state.logs``."""

    def on_train_end(self, state: CallbackState) -> None:
        """Rank, after the last epoch."""


def call_worker_hook(callbacks: Iterable[Any], hook: str, state: CallbackState) -> None:
    """Call a worker hook on each callback that runs on ``state.rank``.

    Parameters
    ----------
    callbacks : iterable of Callback
        Objects with the hook methods (duck typing: a missing hook is skipped).
    hook : str
        One of :data:`WORKER_HOOKS`.
    state : CallbackState

    Examples
    --------
    >>> class Announce(Callback):
    ...     rank_zero_only = True
    ...     def on_train_begin(self, state):
    ...         print(f"rank {state.rank} starts")
    >>> for rank in range(2):
    ...     call_worker_hook([Announce()], "on_train_begin", CallbackState(0, 0, rank, 2))
    rank 0 starts
    """
    if hook not in WORKER_HOOKS:
        raise ValueError(f"unknown worker hook {hook!r}; expected one of {WORKER_HOOKS}")
    for callback in callbacks:
        if getattr(callback, "rank_zero_only", False) and state.rank != 0:
            continue
        method = getattr(callback, hook, None)
        if method is not None:
            method(state)


def call_driver_hook(callbacks: Iterable[Any], hook: str, *args: Any) -> None:
    """Call a driver hook (:data:`DRIVER_HOOKS`) on each callback, in order.

    Examples
    --------
    >>> call_driver_hook([Callback()], "on_fit_end", [], None)
    """
    if hook not in DRIVER_HOOKS:
        raise ValueError(f"unknown driver hook {hook!r}; expected one of {DRIVER_HOOKS}")
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def numeric_logs(logs: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``logs`` (bools and text left out)."""
    found = {}
    for name, value in logs.items():
        if isinstance(value, bool):
            continue
        try:
            found[name] = float(value)
        except (TypeError, ValueError):
            continue
    return found


def require(module: str, extra: str, feature: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{feature} needs the {module} package: pip install 'deepspark[{extra}]'")
