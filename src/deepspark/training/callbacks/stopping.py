"""`EarlyStopping`: end a distributed fit when the monitored value stops improving.

Every rank sees the same reduced record at ``on_epoch_end`` (``train_loss``, ``val_loss``,
``val_<metric>``, ...), so it runs on every rank and each takes the same decision; the loop
also ends the fit on every rank when any rank asks. On a retry or a resume it counts its
patience from the resumed epoch.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from deepspark.training.callbacks.hooks import Callback, CallbackState
from deepspark.training.callbacks.monitoring import beats, monitor_direction, monitored_value

if TYPE_CHECKING:
    from torch import nn

__all__ = ["EarlyStopping"]

_log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """End the fit when a monitored value stops improving, on every rank after the same epoch.

    Runs on every rank: each sees the same reduced values and decides alike, and the loop
    stops every rank when any asks. An epoch *improves* when it beats the best value so far by
    more than ``min_delta`` (and beats ``baseline``, when given); after ``patience``
    consecutive epochs that do not, the fit stops (``patience=0`` and ``1`` both stop at the
    first such epoch, as in Keras and Lightning).

    Parameters
    ----------
    monitor : str, default "val_loss"
        A key of the epoch record: ``train_loss``, ``val_loss``, ``val_<metric>``, ...
    patience : int, default 0
    mode : {"auto", "min", "max"}
        ``"auto"`` maximises names containing accuracy, auc, f1, precision, recall or r2 and
        minimises the rest.
    min_delta : float, default 0.0
        The smallest change that counts as an improvement.
    restore_best_weights : bool, default False
        Keep a CPU copy of the weights of the best epoch and load it back when training ends,
        so the fit returns the best model rather than the last one.
    baseline : float, optional
        A value to beat: epochs that do not beat it count as not improving.

    Attributes
    ----------
    best_score, best_epoch, stopped_epoch
        On each rank while training; on the driver after ``fit``, worked out again from the
        history (the same values when the fit did not resume). ``stopped_epoch`` is None when
        this callback did not stop the fit.

    Examples
    --------
    >>> from deepspark.training.callbacks import call_worker_hook
    >>> stopper = EarlyStopping(monitor="val_loss", patience=1)
    >>> call_worker_hook([stopper], "on_train_begin", CallbackState(0, 0, 0, 1))
    >>> for epoch, loss in enumerate([0.9, 0.7, 0.8, 0.6]):
    ...     state = CallbackState(epoch, 10, 0, 1, logs={"val_loss": loss})
    ...     call_worker_hook([stopper], "on_epoch_end", state)
    ...     if state.stop_training:
    ...         break
    >>> stopper.stopped_epoch, stopper.best_epoch, stopper.best_score
    (2, 1, 0.7)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 0,
        mode: str = "auto",
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
        baseline: float | None = None,
    ) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"EarlyStopping: patience={patience!r}: give an int >= 0")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping: min_delta={min_delta!r}: give a number >= 0")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.restore_best_weights = restore_best_weights
        self.baseline = None if baseline is None else float(baseline)
        self._direction = monitor_direction(monitor, mode)
        self._reset()

    def _reset(self) -> None:
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0  # consecutive epochs without improvement
        self._best_weights: dict[str, Any] | None = None

    def _update(self, epoch: int, value: float, model: nn.Module | None = None) -> bool:
        """Take one epoch's value; True when the fit should stop after it."""
        if beats(value, self.best_score, self._direction, self.min_delta):
            self.best_score, self.best_epoch = value, epoch
            if self.restore_best_weights and model is not None:
                self._best_weights = _cpu_copy(model)
            if self.baseline is None or beats(
                value, self.baseline, self._direction, self.min_delta
            ):
                self._wait = 0
                return False
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_fit_begin(self, params: dict[str, Any]) -> None:
        self._reset()

    def on_fit_end(self, history: list[dict[str, Any]], error: BaseException | None) -> None:
        # the ranks' copies do not come back: replay their decisions on the history
        self._reset()
        for record in history:
            value = record.get(self.monitor)
            if value is not None and self._update(int(record["epoch"]), float(value)):
                break

    def on_train_begin(self, state: CallbackState) -> None:
        self._reset()

    def on_epoch_end(self, state: CallbackState) -> None:
        value = monitored_value("EarlyStopping", self.monitor, state.logs)
        if self._update(state.epoch, value, state.model):
            state.stop_training = True
            if state.rank == 0:
                _log.info(
                    "EarlyStopping: stopping after epoch %d; %s has not improved on %.6g "
                    "(epoch %s) for %d epoch(s)",
                    state.epoch,
                    self.monitor,
                    self.best_score,
                    self.best_epoch,
                    self._wait,
                )

    def on_train_end(self, state: CallbackState) -> None:
        if self._best_weights is not None and state.model is not None:
            from deepspark.persist.weights import unwrap_model

            unwrap_model(state.model).load_state_dict(self._best_weights)
            self._best_weights = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_best_weights"] = None  # weights do not travel between driver and ranks
        return state


def _cpu_copy(model: nn.Module) -> dict[str, Any]:
    from deepspark.persist.weights import unwrap_model

    return {
        name: value.detach().to("cpu", copy=True)
        if hasattr(value, "detach")
        else copy.deepcopy(value)
        for name, value in unwrap_model(model).state_dict().items()
    }
