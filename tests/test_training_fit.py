"""Estimator.fit / evaluate on real Spark sessions, with real digits data."""

from __future__ import annotations

import os
import threading
import time

import cloudpickle
import numpy as np
import psutil
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_arrays, digits_frames
from conftest import started_by_this_run

# Spark's Python workers cannot import the tests folder: ship these helpers by value.
cloudpickle.register_pickle_by_value(helpers)

EPOCHS, BATCH, LR = 8, 64, 3e-3


def _estimator(seed: int = 0, metrics=("accuracy",)) -> ds.Estimator:
    torch.manual_seed(seed)
    return ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=list(metrics),
    )


def _orphans(since: float) -> list[str]:
    """Spark or deepspark processes started after `since` that lost their parent."""
    found = []
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        info = process.info
        cmdline = " ".join(info["cmdline"] or [])
        if (
            info["create_time"] >= since
            and info["ppid"] == 1
            and "pyspark" in cmdline
            and started_by_this_run(process)
        ):
            found.append(f"{info['pid']}: {cmdline}")
    return found


def _listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}


@pytest.mark.slow
def test_fit_on_local_reaches_accuracy_and_matches_single_process(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
    )
    assert list(history["epoch"]) == list(range(EPOCHS))
    assert {"train_loss", "val_loss", "val_accuracy", "samples_per_s", "seconds"} <= set(
        history.columns
    )
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] / 3
    accuracy = history["val_accuracy"].iloc[-1]
    assert accuracy >= 0.95
    single = helpers.train_single_process(EPOCHS, BATCH, LR)
    assert abs(accuracy - single) <= 0.03, (accuracy, single)
    assert est.history is history

    # the trained weights came back to the driver's model
    _, _, test_x, test_y = digits_arrays()
    with torch.no_grad():
        local_accuracy = est.get_model()(torch.from_numpy(test_x)).argmax(1).numpy() == test_y
    assert local_accuracy.mean() == pytest.approx(accuracy, abs=1e-9)

    # the timeline covers the fit: every span was reported, and together they make the total
    spans = dict(est.timings_)
    total = spans.pop("total")
    alongside = {name: spans.pop(name) for name in ("first_batch", "input_read")}
    assert list(spans) == [
        "driver_checks",
        "job_submit",
        "worker_start",
        "rendezvous",
        "model_setup",
        "first_step",
        "epochs",
        "validation",
        "weights_return",
        "load_weights",
    ]
    assert all(np.isfinite(value) and value >= 0 for value in spans.values()), spans
    assert sum(spans.values()) == pytest.approx(total, rel=0.02), (spans, total)
    # the input thread's spans lie inside the task: the partition was read before training ended
    assert 0 <= alongside["first_batch"] <= alongside["input_read"] < total
    assert spans["validation"] > 0  # a validation set was given: its passes were counted


@pytest.mark.slow
def test_evaluate_metrics_equal_numpy_on_the_same_predictions(spark):
    train_df, test_df = digits_frames(spark)
    est = _estimator(metrics=("accuracy", "top5_accuracy"))
    est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=2,
        batch_size=BATCH,
        num_workers=2,
    )
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label", num_workers=2)
    _, _, test_x, test_y = digits_arrays()
    with torch.no_grad():
        logits = est.get_model()(torch.from_numpy(test_x))
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(test_y))
    top5 = np.argsort(-logits.numpy(), axis=1)[:, :5]
    assert scores["accuracy"] == pytest.approx((logits.argmax(1).numpy() == test_y).mean())
    assert scores["top5_accuracy"] == pytest.approx((top5 == test_y[:, None]).any(1).mean())
    assert scores["loss"] == pytest.approx(float(expected_loss), rel=1e-5)


@pytest.mark.slow
def test_uneven_and_empty_partitions_train_without_hanging(spark):
    from pyspark.sql import functions as F

    train_df, test_df = digits_frames(spark)
    train_rows = train_df.count()
    # every row hashes to one partition: the other is empty
    lopsided = train_df.repartition(2, F.lit(1))
    assert sorted(len(p) for p in lopsided.rdd.glom().collect()) == [0, train_rows]
    est = _estimator()
    history = est.fit(
        lopsided,
        feature_cols="features",
        label_cols="label",
        epochs=3,
        batch_size=BATCH,
        num_workers=2,
        seed=1,
    )
    assert history["train_rows"].tolist() == [train_rows] * 3
    # uneven but not empty: about 1/4 and 3/4, by two keys that hash to different partitions
    keys = [
        r.k
        for r in spark.range(8)
        .where(F.pmod(F.hash("id"), F.lit(2)) == 0)
        .selectExpr("id AS k")
        .collect()
    ]
    other = [
        r.k
        for r in spark.range(8)
        .where(F.pmod(F.hash("id"), F.lit(2)) == 1)
        .selectExpr("id AS k")
        .collect()
    ]
    key = F.when(F.rand(seed=3) < 0.25, F.lit(keys[0])).otherwise(F.lit(other[0]))
    uneven = train_df.withColumn("k", key.cast("long")).repartition(2, "k").drop("k")
    sizes = sorted(len(p) for p in uneven.rdd.glom().collect())
    assert 0 < sizes[0] < sizes[1] / 2, sizes
    history = est.fit(
        uneven,
        feature_cols="features",
        label_cols="label",
        epochs=3,
        batch_size=BATCH,
        num_workers=2,
        seed=1,
    )
    assert history["train_rows"].tolist() == [train_rows] * 3  # both partitions, every row
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] >= 0.9


def test_fit_refuses_bad_arguments_before_any_job(spark):
    train_df, _ = digits_frames(spark)
    est = _estimator()
    with pytest.raises(ValueError, match=r"num_workers=3 is more than the 2 task slots"):
        est.fit(train_df, feature_cols="features", label_cols="label", num_workers=3)
    with pytest.raises(ValueError, match=r"batch_size=1 is smaller than num_workers=2"):
        est.fit(train_df, feature_cols="features", label_cols="label", batch_size=1, num_workers=2)
    with pytest.raises(ValueError, match=r"pixels"):
        est.fit(train_df, feature_cols="pixels", label_cols="label", num_workers=2)
    float_labels = train_df.selectExpr("features", "cast(label as double) / 10 AS label")
    with pytest.raises(ValueError, match=r"labels do not suit the loss"):
        est.fit(
            float_labels,
            feature_cols="features",
            label_cols="label",
            num_workers=2,
            label_dtypes={"label": "float32"},
        )
    unpicklable = ds.Estimator.from_torch(
        model=_ModelWithLock(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
    )
    with pytest.raises(ValueError, match=r"model could not be pickled"):
        unpicklable.fit(train_df, feature_cols="features", label_cols="label", num_workers=2)


def test_wrong_inputs_fail_on_the_driver_naming_the_argument(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    good = {"feature_cols": "features", "label_cols": "label", "num_workers": 2}
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module.*str"):
        ds.Estimator.from_torch(model="resnet", loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"loss must be callable"):
        ds.Estimator.from_torch(model=DigitsNet(), loss="cross_entropy")

    def two_arguments(params, config):
        return torch.optim.SGD(params, lr=0.1)

    wrong_signature = ds.Estimator.from_torch(
        model=DigitsNet(), optimizer=two_arguments, loss=torch.nn.CrossEntropyLoss()
    )
    with pytest.raises(TypeError, match=r"optimizer=.*two_arguments failed"):
        wrong_signature.fit(train_df, **good)
    with pytest.raises(ValueError, match=r"metrics: 'acuracy' cannot be computed"):
        _estimator(metrics=["acuracy"]).fit(train_df, **good)
    est = _estimator()
    with pytest.raises(ValueError, match=r"checkpoint_dir='nosuchscheme://x'.*protocol"):
        est.fit(train_df, checkpoint_dir="nosuchscheme://x", **good)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if not os.access(read_only, os.W_OK):  # root may write anywhere
            with pytest.raises(ValueError, match=r"checkpoint_dir=.*not writable"):
                est.fit(train_df, checkpoint_dir=str(read_only / "ckpt"), **good)
    finally:
        read_only.chmod(0o700)


@pytest.mark.slow
def test_second_fit_into_a_used_checkpoint_dir_resumes_only_when_asked(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    checkpoints = str(tmp_path / "ckpt")
    args = {"feature_cols": "features", "label_cols": "label", "batch_size": BATCH}
    first = _estimator()
    first.fit(train_df, epochs=2, num_workers=2, checkpoint_dir=checkpoints, **args)
    again = _estimator(seed=1)
    with pytest.raises(ValueError, match=r"already holds checkpoints.*resume=True.*new"):
        again.fit(train_df, epochs=3, num_workers=2, checkpoint_dir=checkpoints, **args)
    # resume=True continues the run: only the third epoch trains, from the saved weights
    history = again.fit(
        train_df, epochs=3, num_workers=2, checkpoint_dir=checkpoints, resume=True, **args
    )
    assert history["epoch"].tolist() == [0, 1, 2]
    # the first two epochs are the first run's, restored from its checkpoint
    assert history["train_loss"].tolist()[:2] == first.history["train_loss"].tolist()
    assert again.evaluate(test_df, **args)["accuracy"] >= 0.85
    # a fresh directory trains from the start
    fresh = _estimator(seed=1).fit(
        train_df, epochs=1, num_workers=2, checkpoint_dir=str(tmp_path / "new"), **args
    )
    assert fresh["epoch"].tolist() == [0]


@pytest.mark.slow
def test_training_error_names_the_failing_rank_and_its_exception(spark):
    train_df, _ = digits_frames(spark)
    est = ds.Estimator.from_torch(
        model=helpers.FailingOnRank(rank=1, message="no data for this shard"),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
    )
    with pytest.raises(ds.TrainingError) as failure:
        est.fit(train_df, feature_cols="features", label_cols="label", num_workers=2)
    first_line = str(failure.value).splitlines()[1]
    assert first_line.strip() == "attempt 1: rank 1: RuntimeError: no data for this shard", str(
        failure.value
    )


class _ModelWithLock(DigitsNet):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_rank_killed_mid_fit_resumes_from_checkpoint(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    ports_before = _listening_ports()
    started = time.time()
    est = _estimator()
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=2, step=3)
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=4,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_failures=1,
        callbacks=[killer],
        seed=0,
    )
    assert (tmp_path / "killed").exists(), "the callback never killed rank 1"
    # each epoch exactly once: epochs 0-1 from the first attempt's checkpoints, 2-3 re-run;
    # a second attempt that did not restore would train all four epochs again
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["attempt"].tolist() == [1, 1, 2, 2]
    assert history["val_accuracy"].iloc[-1] >= 0.9
    assert est.attempts_ == 2
    leaked = (_listening_ports() - ports_before) & set(est.job_ports_)
    owners = [
        (c.laddr, c.pid, psutil.Process(c.pid).cmdline() if c.pid else None)
        for c in psutil.net_connections("tcp")
        if c.status == "LISTEN" and c.laddr.port in leaked
    ]
    assert not leaked, (est.job_ports_, owners)
    assert not _orphans(started)


@pytest.mark.slow
def test_rank_killed_without_max_failures_fails_fast_with_its_rank(spark, tmp_path):
    train_df, _ = digits_frames(spark)
    started = time.time()
    est = _estimator()
    killer = helpers.KillRankOnce(str(tmp_path / "killed"), rank=1, epoch=0, step=2)
    with pytest.raises(ds.TrainingError, match=r"failed after 1 attempt") as failure:
        est.fit(
            train_df,
            feature_cols="features",
            label_cols="label",
            epochs=3,
            batch_size=BATCH,
            num_workers=2,
            callbacks=[killer],
        )
    message = str(failure.value)
    assert "attempt 1: rank 1: Python worker exited unexpectedly" in message, message
    assert not _orphans(started)


@pytest.mark.slow
def test_python_worker_killed_from_outside_resumes(spark, tmp_path):
    import os
    import signal

    train_df, _ = digits_frames(spark)
    pid_file = tmp_path / "pid"
    stop = threading.Event()
    started = time.time()

    def kill_when_ready():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                time.sleep(0.3)
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    est = _estimator()
    try:
        history = est.fit(
            train_df,
            feature_cols="features",
            label_cols="label",
            epochs=3,
            batch_size=BATCH,
            num_workers=2,
            checkpoint_dir=str(tmp_path / "ckpt"),
            max_failures=1,
            callbacks=[helpers.WritePidAt(str(pid_file), rank=1, epoch=1)],
            seed=0,
        )
    finally:
        stop.set()
        killer.join(timeout=10)
    assert pid_file.exists()
    assert not psutil.pid_exists(int(pid_file.read_text())) or (
        psutil.Process(int(pid_file.read_text())).status() == psutil.STATUS_ZOMBIE
    )
    assert history["epoch"].tolist() == [0, 1, 2]
    # killed in epoch 1: epoch 0 comes from the first attempt's checkpoint, 1-2 are re-run
    assert history["attempt"].tolist() == [1, 2, 2]
    assert all(torch.isfinite(p).all() for p in est.get_model().parameters())
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert est.attempts_ == 2
    assert not _orphans(started)


@pytest.mark.slow
def test_fit_on_local_cluster(local_cluster_spark):
    train_df, test_df = digits_frames(local_cluster_spark)
    est = _estimator()
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=6,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
    )
    assert history["val_accuracy"].iloc[-1] >= 0.93


@pytest.mark.slow
def test_fit_on_spark_connect(connect_spark):
    train_df, test_df = digits_frames(connect_spark)
    est = _estimator()
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=6,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
    )
    assert history["val_accuracy"].iloc[-1] >= 0.93
    scores = est.evaluate(test_df, feature_cols="features", label_cols="label")
    assert scores["accuracy"] == pytest.approx(history["val_accuracy"].iloc[-1], abs=1e-9)


@pytest.mark.slow
def test_fit_logs_to_tensorboard_and_mlflow(spark, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deepspark.persist.weights import load_model_weights
    from deepspark.training.callbacks import MLflowCallback, TensorBoardCallback

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking_uri = (tmp_path / "mlruns").as_uri()
    train_df, test_df = digits_frames(spark)
    est = _estimator()
    mlflow_callback = MLflowCallback(tracking_uri, experiment="digits-fit")
    history = est.fit(
        train_df,
        feature_cols="features",
        label_cols="label",
        epochs=3,
        batch_size=BATCH,
        validation_data=test_df,
        num_workers=2,
        seed=0,
        callbacks=[TensorBoardCallback(str(tmp_path / "tb")), mlflow_callback],
    )
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [point.value for point in events.Scalars("val_accuracy")]
    assert logged == pytest.approx(history["val_accuracy"].tolist(), abs=1e-6)

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(mlflow_callback.run_id)
    assert run.info.status == "FINISHED"
    points = client.get_metric_history(mlflow_callback.run_id, "train_loss")
    assert [p.value for p in sorted(points, key=lambda p: p.step)] == pytest.approx(
        history["train_loss"].tolist(), rel=1e-6
    )
    artifacts = [a.path for a in client.list_artifacts(mlflow_callback.run_id, "model")]
    assert artifacts == ["model/model.safetensors"]
    # the logged model is the trained one that came back to the driver
    logged_weights = load_model_weights(
        client.download_artifacts(mlflow_callback.run_id, "model/model.safetensors")
    )
    for name, tensor in est.get_model().state_dict().items():
        assert torch.equal(logged_weights[name], tensor), name
