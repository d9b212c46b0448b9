"""Callbacks: hook dispatch, and real TensorBoard event files and MLflow runs on disk."""

from __future__ import annotations

import cloudpickle
import pytest
import torch

from deepspark.persist.weights import load_model_weights
from deepspark.training.callbacks import (
    Callback,
    CallbackState,
    MLflowCallback,
    TensorBoardCallback,
    call_driver_hook,
    call_worker_hook,
)

EPOCHS = 3
STEPS = 4


def epoch_logs(epoch: int) -> dict[str, float]:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / (epoch + 1),
        "val_accuracy": 0.5 + 0.1 * epoch,
        "seconds": 2.0,
    }


def run_rank(callbacks, rank: int = 0, world_size: int = 2, model=None) -> None:
    """Drive the worker hooks as a training loop does, on copies that travelled by pickle."""
    copies = cloudpickle.loads(cloudpickle.dumps(callbacks))
    params = {"batch_size": 32, "num_workers": world_size}

    def state(epoch: int, step: int, logs: dict) -> CallbackState:
        return CallbackState(epoch, step, rank, world_size, logs, model, EPOCHS, params)

    call_worker_hook(copies, "on_train_begin", state(0, 0, {}))
    for epoch in range(EPOCHS):
        call_worker_hook(copies, "on_epoch_begin", state(epoch, 0, {}))
        for step in range(STEPS):
            call_worker_hook(copies, "on_batch_end", state(epoch, step, {"loss": 0.1 * step}))
        call_worker_hook(copies, "on_epoch_end", state(epoch, STEPS, epoch_logs(epoch)))
    call_worker_hook(copies, "on_train_end", state(EPOCHS - 1, 0, epoch_logs(EPOCHS - 1)))


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def on_epoch_end(self, state):
        self.calls.append(("on_epoch_end", state.rank, state.epoch))


class RankZeroRecorder(Recorder):
    rank_zero_only = True


def test_hooks_run_on_every_rank_unless_rank_zero_only():
    everywhere, rank_zero = Recorder(), RankZeroRecorder()
    for rank in (0, 1):
        state = CallbackState(epoch=2, step=0, rank=rank, world_size=2)
        call_worker_hook([everywhere, rank_zero, object()], "on_epoch_end", state)
    assert everywhere.calls == [("on_epoch_end", 0, 2), ("on_epoch_end", 1, 2)]
    assert rank_zero.calls == [("on_epoch_end", 0, 2)]
    with pytest.raises(ValueError, match="unknown worker hook"):
        call_worker_hook([everywhere], "on_fit_end", state)
    with pytest.raises(ValueError, match="unknown driver hook"):
        call_driver_hook([everywhere], "on_epoch_end", state)


def test_tensorboard_event_files_hold_the_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tensorboard"
    callback = TensorBoardCallback(str(log_dir), batch_loss_every=2)
    run_rank([callback], rank=1)  # rank 1 writes nothing
    assert not log_dir.exists()
    run_rank([callback], rank=0)

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train_loss", "val_accuracy", "seconds", "batch/loss"} <= set(scalars)
    assert "epoch" not in scalars
    val_accuracy = events.Scalars("val_accuracy")
    assert [point.step for point in val_accuracy] == list(range(EPOCHS))
    assert [point.value for point in val_accuracy] == pytest.approx([0.5, 0.6, 0.7])
    assert len(events.Scalars("batch/loss")) == EPOCHS * STEPS // 2


def _mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    pytest.importorskip("mlflow")
    # MLflow 3 keeps its file store only on request; a local store needs no server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_run_created_on_the_driver_gets_metrics_and_the_model(tracking_uri):
    model = torch.nn.Linear(3, 2)
    callback = MLflowCallback(tracking_uri, experiment="digits", run_name="fit-1")
    call_driver_hook([callback], "on_fit_begin", {"epochs": EPOCHS, "batch_size": 32})
    run_rank([callback], rank=1, model=model)
    run_rank([callback], rank=0, model=model)
    history = [epoch_logs(epoch) for epoch in range(EPOCHS)]
    call_driver_hook([callback], "on_fit_end", history, None)

    client = _mlflow_client(tracking_uri)
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fit-1"
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    assert run.data.params == {"epochs": "3", "batch_size": "32"}
    history_points = client.get_metric_history(callback.run_id, "val_accuracy")
    assert sorted((point.step, point.value) for point in history_points) == [
        (0, pytest.approx(0.5)),
        (1, pytest.approx(0.6)),
        (2, pytest.approx(0.7)),
    ]
    assert "epoch" not in run.data.metrics
    artifacts = [item.path for item in client.list_artifacts(callback.run_id, "model")]
    assert artifacts == ["model/model.safetensors"]
    local = client.download_artifacts(callback.run_id, "model/model.safetensors")
    weights = load_model_weights(local)
    assert torch.equal(weights["weight"], model.weight.detach())


def test_mlflow_without_driver_hooks_owns_its_run_and_failed_fits_are_marked(tracking_uri):
    callback = MLflowCallback(tracking_uri, log_model=False, params={"note": "loop"})
    run_rank([callback], rank=0)  # the copy creates and finishes its own run
    client = _mlflow_client(tracking_uri)
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "epochs": "3",
        "world_size": "2",
        "batch_size": "32",
        "num_workers": "2",
        "note": "loop",
    }
    assert run.data.metrics["train_loss"] == pytest.approx(1 / 3)
    assert client.list_artifacts(run.info.run_id) == []

    failing = MLflowCallback(tracking_uri, run_name="doomed")
    call_driver_hook([failing], "on_fit_begin", {})
    call_driver_hook([failing], "on_fit_end", [], RuntimeError("worker lost"))
    assert client.get_run(failing.run_id).info.status == "FAILED"
