"""Training callbacks, with TensorBoard and MLflow integrations.

Built in: :class:`EarlyStopping`, :class:`ModelCheckpoint` and :class:`CSVLogger` (defined in
:mod:`deepspark.training.builtin_callbacks`), :class:`TensorBoardCallback` and
:class:`MLflowCallback`.

A callback object lives in two places during ``Estimator.fit``:

* **on the driver**, the object the user passed: :meth:`Callback.on_fit_begin` runs before the
  job starts and :meth:`Callback.on_fit_end` after it finished (or failed for good);
* **on every rank**, a pickled copy made when the job is launched (again for each retry): the
  worker hooks ``on_train_begin``, ``on_epoch_begin``, ``on_batch_end``, ``on_epoch_end`` and
  ``on_train_end`` run there with a :class:`CallbackState`. Callbacks with
  ``rank_zero_only = True`` run on rank 0 only.

What a worker copy changes on itself does not come back to the driver; what ``on_fit_begin``
sets on the driver's object is in every worker copy (:class:`MLflowCallback` creates its run
there, so all retries log into one run).

Worker hooks are called with :func:`call_worker_hook` and driver hooks with
:func:`call_driver_hook`. ``state.logs`` holds, at ``on_batch_end``, the batch's ``loss``; at
``on_epoch_end``, the epoch's reduced values (``train_loss``, ``val_loss``, ``val_<metric>``,
...); at ``on_train_end``, the last epoch's.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from deepspark.training.builtin_callbacks import CSVLogger, EarlyStopping, ModelCheckpoint

__all__ = [
    "DRIVER_HOOKS",
    "WORKER_HOOKS",
    "CSVLogger",
    "Callback",
    "CallbackState",
    "EarlyStopping",
    "MLflowCallback",
    "ModelCheckpoint",
    "TensorBoardCallback",
    "call_driver_hook",
    "call_worker_hook",
]

# defined beside their base class's module, which they import: resolved on first use
_BUILT_IN = ("CSVLogger", "EarlyStopping", "ModelCheckpoint")


def __getattr__(name: str) -> Any:
    if name in _BUILT_IN:
        from deepspark.training import builtin_callbacks

        return getattr(builtin_callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _numbers(logs: dict[str, Any]) -> dict[str, float]:
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


def _require(module: str, extra: str, feature: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{feature} needs the {module} package: pip install 'deepspark[{extra}]'")


class TensorBoardCallback(Callback):
    """Write per-epoch scalars (and optionally the batch loss) for TensorBoard.

    Runs on rank 0. Each numeric value of ``state.logs`` at epoch end becomes a scalar under
    its own name (``train_loss``, ``val_accuracy``, ...) with the epoch as the step. Needs the
    ``tensorboard`` extra.

    Parameters
    ----------
    log_dir : str
        Local directory of the event files, as seen from the rank 0 executor.
    batch_loss_every : int, optional
        Also log ``batch/loss`` every this many steps.

    Examples
    --------
    >>> import tempfile
    >>> callback = TensorBoardCallback(tempfile.mkdtemp())
    >>> state = CallbackState(epoch=0, step=5, rank=0, world_size=1, logs={"train_loss": 0.3})
    >>> for hook in ("on_train_begin", "on_epoch_end", "on_train_end"):
    ...     call_worker_hook([callback], hook, state)
    """

    rank_zero_only = True

    def __init__(self, log_dir: str, batch_loss_every: int | None = None) -> None:
        _require("tensorboard", "tensorboard", "TensorBoardCallback")
        if batch_loss_every is not None and batch_loss_every < 1:
            raise ValueError(f"batch_loss_every must be at least 1, got {batch_loss_every}")
        self.log_dir = os.fspath(log_dir)
        self.batch_loss_every = batch_loss_every
        self._writer: Any = None
        self._batches = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_writer"] = None  # an open writer does not travel to the workers
        return state

    def on_train_begin(self, state: CallbackState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=self.log_dir)

    def on_batch_end(self, state: CallbackState) -> None:
        if self._writer is None or self.batch_loss_every is None:
            return
        self._batches += 1
        if self._batches % self.batch_loss_every == 0 and "loss" in state.logs:
            self._writer.add_scalar("batch/loss", float(state.logs["loss"]), self._batches)

    def on_epoch_end(self, state: CallbackState) -> None:
        if self._writer is None:
            return
        for name, value in _numbers(state.logs).items():
            if name != "epoch":
                self._writer.add_scalar(name, value, state.epoch)
        self._writer.flush()

    def on_train_end(self, state: CallbackState) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# Environment that MLflow reads and that executors need as the driver has it; no credentials.
_MLFLOW_ENVIRONMENT = ("MLFLOW_ALLOW_FILE_STORE",)


class MLflowCallback(Callback):
    """Track a fit in MLflow: parameters, per-epoch metrics and the trained weights.

    With ``Estimator.fit`` the run is created on the driver (:meth:`on_fit_begin`), every
    attempt of the job logs into it from rank 0, and :meth:`on_fit_end` marks it ``FINISHED``
    or ``FAILED``. Used only through worker hooks (a loop of your own), rank 0 creates the run
    at ``on_train_begin`` and finishes it at ``on_train_end``. The weights are logged as
    ``<artifact_path>/model.safetensors``. Needs the ``mlflow`` extra; executors must reach the
    tracking server (or, for a ``file:`` store, the same file system).

    Parameters
    ----------
    tracking_uri : str, optional
        Defaults to MLflow's own default as the driver sees it (``MLFLOW_TRACKING_URI``, ...).
    experiment : str, optional
        Experiment name, created when missing; MLflow's default experiment when omitted.
    run_name : str, optional
    params : dict, optional
        Extra parameters to log beside the fit's own.
    log_model : bool, default True
        Log the final weights as an artifact.
    artifact_path : str, default "model"

    Attributes
    ----------
    run_id : str or None
        The run, once created.

    Examples
    --------
    >>> callback = MLflowCallback("file:///tmp/mlruns", experiment="digits", run_name="mlp")
    >>> callback.run_id is None  # nothing is created before the fit starts
    True
    """

    rank_zero_only = True

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
        log_model: bool = True,
        artifact_path: str = "model",
    ) -> None:
        _require("mlflow", "mlflow", "MLflowCallback")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params or {})
        self.log_model = log_model
        self.artifact_path = artifact_path
        self.run_id: str | None = None
        self._environment = {
            name: os.environ[name] for name in _MLFLOW_ENVIRONMENT if name in os.environ
        }
        self._owns_run = False

    def _client(self) -> Any:
        for name, value in self._environment.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        if self.tracking_uri is None:
            import mlflow

            self.tracking_uri = mlflow.get_tracking_uri()
        return MlflowClient(tracking_uri=self.tracking_uri)

    def _create_run(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        client = self._client()
        experiment_id = "0"
        if self.experiment:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id if found else client.create_experiment(self.experiment)
            )
        run = client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        merged = {**params, **self.params}
        if merged:
            client.log_batch(
                self.run_id,
                params=[Param(str(key), str(value)[:500]) for key, value in merged.items()],
            )

    def on_fit_begin(self, params: dict[str, Any]) -> None:
        self._create_run(params)

    def on_fit_end(self, history: list[dict[str, Any]], error: BaseException | None) -> None:
        if self.run_id is not None:
            self._client().set_terminated(self.run_id, "FAILED" if error else "FINISHED")

    def on_train_begin(self, state: CallbackState) -> None:
        if self.run_id is None:
            self._owns_run = True
            self._create_run(
                {"epochs": state.epochs, "world_size": state.world_size, **state.params}
            )

    def on_epoch_end(self, state: CallbackState) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now, state.epoch)
            for name, value in _numbers(state.logs).items()
            if name != "epoch" and not math.isinf(value)
        ]
        if metrics:
            self._client().log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, state: CallbackState) -> None:
        if self.run_id is None:
            return
        client = self._client()
        if self.log_model and state.model is not None:
            from deepspark.persist.weights import save_model_weights, unwrap_model

            with tempfile.TemporaryDirectory(prefix="deepspark-mlflow-") as folder:
                path = os.path.join(folder, "model.safetensors")
                save_model_weights(path, unwrap_model(state.model).state_dict())
                client.log_artifact(self.run_id, path, self.artifact_path)
        if self._owns_run:
            client.set_terminated(self.run_id, "FINISHED")
