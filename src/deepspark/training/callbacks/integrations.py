"""Callbacks that log a fit to TensorBoard or MLflow (optional extras, imported lazily)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from deepspark.training.callbacks.hooks import Callback, CallbackState, numeric_logs, require

__all__ = ["MLflowCallback", "TensorBoardCallback"]


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
        require("tensorboard", "tensorboard", "TensorBoardCallback")
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
        for name, value in numeric_logs(state.logs).items():
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
        require("mlflow", "mlflow", "MLflowCallback")
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
            for name, value in numeric_logs(state.logs).items()
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
