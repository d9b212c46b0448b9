"""`predict` on real Spark sessions: local, local-cluster (separate executor JVMs) and Connect."""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch

from deepspark.inference import (
    ModelInputError,
    export_onnx,
    export_program,
    export_torchscript,
    predict,
)

# Models defined here travel to executors that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FEATURES = 6
ROWS = 120


def make_mlp(outputs: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, outputs)
    ).eval()


def feature_frame(spark, rows: int = ROWS, partitions: int = 3):
    """Rows ``id, x, tag`` in ``partitions`` partitions; ``x`` is a deterministic float array."""
    terms = ", ".join(f"cast(sin(id * 0.37 + {k}) * {k + 1} as float)" for k in range(FEATURES))
    return spark.range(0, rows, 1, numPartitions=partitions).selectExpr(
        "id", f"array({terms}) as x", "concat('tag-', cast(id as string)) as tag"
    )


def torch_outputs(df, model: torch.nn.Module) -> tuple[list[int], torch.Tensor]:
    """Single-process reference: the model on every row, collected to this process."""
    rows = df.select("id", "x").collect()
    inputs = torch.tensor([row.x for row in rows], dtype=torch.float32)
    with torch.no_grad():
        return [row.id for row in rows], model(inputs)


MODEL_KINDS = ["torch", "torchscript", "torch_export", "onnx", "saved"]


# session scope: the tests are ordered by session kind, so this module's local and Connect
# tests do not run in one stretch, and a module-scoped fixture would be built twice
@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, object]:
    """One MLP in every form predict takes, each export verified against torch."""
    from deepspark import Estimator

    root = tmp_path_factory.mktemp("models")
    model = make_mlp()
    sample = torch.randn(4, FEATURES)
    estimator = Estimator.from_torch(model=model, loss=torch.nn.MSELoss())
    return {
        "reference": model,
        "torch": model,
        "torchscript": export_torchscript(model, str(root / "mlp.ts"), sample),
        "torch_export": export_program(model, str(root / "mlp.pt2"), sample),
        "onnx": export_onnx(model, str(root / "mlp.onnx"), sample, input_names=["x"]),
        "saved": estimator.save(str(root / "estimator")),
    }


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_predictions_equal_single_process_torch_for_every_model_kind(spark, model_files, kind):
    df = feature_frame(spark)
    scored = predict(df, model_files[kind], "x", batch_size=16, feature_shapes={"x": (FEATURES,)})
    rows = scored.collect()
    ids, expected = torch_outputs(df, model_files["reference"])
    assert [row.id for row in rows] == ids == list(range(ROWS))  # order kept
    assert [row.tag for row in rows] == [f"tag-{i}" for i in ids]  # passthrough kept
    predicted = torch.tensor([row.prediction for row in rows])
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_output_kinds_give_typed_columns(spark):
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, IntegerType

    df = feature_frame(spark, rows=30)
    classifier, regressor = make_mlp(outputs=4), make_mlp(outputs=1)
    _, logits = torch_outputs(df, classifier)
    _, scores = torch_outputs(df, regressor)

    classes = predict(df, classifier, "x", output="class", passthrough_cols=["id"])
    assert classes.columns == ["id", "prediction"]
    assert classes.schema["prediction"].dataType == IntegerType()
    assert [row.prediction for row in classes.collect()] == logits.argmax(dim=1).tolist()

    probabilities = predict(df, classifier, "x", output="probabilities", output_col="p")
    assert probabilities.schema["p"].dataType == ArrayType(FloatType(), containsNull=False)
    values = np.array([row.p for row in probabilities.collect()])
    np.testing.assert_allclose(values, torch.softmax(logits, dim=1).numpy(), atol=1e-6)

    doubles = predict(df, regressor, "x")  # auto: one output per row
    assert doubles.schema["prediction"].dataType == DoubleType()
    predicted = [row.prediction for row in doubles.collect()]
    np.testing.assert_allclose(predicted, scores[:, 0].numpy(), atol=1e-5)


def test_feature_shapes_the_model_cannot_take_fail_on_the_driver(spark, model_files):
    df = feature_frame(spark, rows=10)
    narrow = torch.nn.Linear(4, 1)
    with pytest.raises(ModelInputError, match=r"'x' \(N=2, 6\) float32.*expects \(N, 4\)"):
        predict(df, narrow, "x")
    with pytest.raises(ModelInputError, match=r"'x' \(N=2, 2, 3\).*'x' \(batch, 6\)"):
        predict(df, model_files["onnx"], "x", feature_shapes={"x": (2, 3)})


def test_a_model_path_that_does_not_exist_is_refused(spark, tmp_path):
    df = feature_frame(spark, rows=10)
    with pytest.raises(FileNotFoundError, match="missing.onnx.*does not exist"):
        predict(df, str(tmp_path / "missing.onnx"), "x")


def test_onnx_input_names_that_do_not_match_are_refused(spark, model_files):
    df = feature_frame(spark, rows=10)
    with pytest.raises(ModelInputError, match=r"input_names=\['features'\].*'x' \(batch, 6\)"):
        predict(df, model_files["onnx"], "x", input_names=["features"])
    scored = predict(df, model_files["onnx"], "x", input_names=["x"], passthrough_cols=[])
    assert scored.count() == 10


def test_arguments_are_checked_before_any_job(spark, model_files):
    df = feature_frame(spark, rows=10)
    model = model_files["torch"]
    with pytest.raises(ValueError, match="output_col='tag' already exists"):
        predict(df, model, "x", output_col="tag")
    with pytest.raises(ValueError, match=r"passthrough_cols \['nope'\]"):
        predict(df, model, "x", passthrough_cols=["nope"])
    with pytest.raises(ValueError, match="batch_size=0"):
        predict(df, model, "x", batch_size=0)
    with pytest.raises(ValueError, match="output='labels' is not known"):
        predict(df, model, "x", output="labels")
    with pytest.raises(ModelInputError, match="output='double' needs one value per row"):
        predict(df, model, "x", output="double")


class FailsOnWorkers(torch.nn.Module):
    """Predicts on the driver (so the probe passes), raises inside Spark's Python workers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp(outputs=1)
        self.driver_pid = os.getpid()

    def forward(self, x):
        if os.getpid() != self.driver_pid:
            raise ValueError("this model refuses to run on a worker")
        return self.net(x)


@pytest.mark.slow
def test_a_model_failing_on_the_workers_names_its_error_and_partition(spark):
    scored = predict(feature_frame(spark, rows=20, partitions=2), FailsOnWorkers(), "x")
    summary = r"deepspark predict: partition [01]: ValueError: this model refuses to run on a"
    with pytest.raises(Exception, match=summary) as info:
        scored.collect()
    # Spark keeps only the last exception of the worker's traceback: the summary carries all.
    assert "ModelInputError" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Separate executor JVMs: the model cache per Python worker, and task retries during a write.


def make_recording_model(log_dir: str) -> torch.nn.Module:
    """An MLP that leaves a file behind each time it is unpickled and each time it runs."""

    class LoadRecorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_dir = log_dir
            self.net = make_mlp(outputs=2)

        def __setstate__(self, state):
            super().__setstate__(state)
            Path(self.log_dir, f"load-{os.getpid()}-{uuid.uuid4().hex}").touch()

        def forward(self, x):
            from pyspark import TaskContext

            context = TaskContext.get()
            stage = context.stageId() if context is not None else "driver"
            Path(self.log_dir, f"call-{os.getpid()}-{stage}-{uuid.uuid4().hex}").touch()
            return self.net(x)

    return LoadRecorder()


@pytest.mark.slow
def test_model_loads_once_per_python_worker_across_two_jobs(local_cluster_spark, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    model = make_recording_model(str(log_dir))
    df = feature_frame(local_cluster_spark, rows=80, partitions=4)
    # A tiny inline limit: the model also travels by path (spilled), as a large one would.
    for _ in range(2):
        scored = predict(df, model, "x", batch_size=8, max_inline_bytes=512)
        # collect, not count: a count does not read the prediction, and Spark skips the UDF
        assert len(scored.collect()) == 80

    loads = Counter(name.split("-")[1] for name in os.listdir(log_dir) if name.startswith("load"))
    stages_by_pid: dict[str, set[str]] = {}
    for name in os.listdir(log_dir):
        if name.startswith("call"):
            _, pid, stage, _ = name.split("-")
            if stage != "driver":
                stages_by_pid.setdefault(pid, set()).add(stage)
    assert stages_by_pid, "no task ran the model"
    # Every Python worker that ran tasks unpickled the model exactly once ...
    assert {pid: loads[pid] for pid in stages_by_pid} == dict.fromkeys(stages_by_pid, 1)
    # ... and at least one of them served both jobs from that one load.
    assert max(len(stages) for stages in stages_by_pid.values()) >= 2


def make_failing_model(marker_dir: str) -> torch.nn.Module:
    """Fails partition 1 on its first attempt, after that attempt already produced rows."""

    class FailOnce(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.marker_dir = marker_dir
            self.net = make_mlp(outputs=1)
            self.calls: Counter = Counter()

        def forward(self, x):
            from pyspark import TaskContext

            context = TaskContext.get()
            if context is not None and context.partitionId() == 1:
                attempt = (context.stageId(), context.attemptNumber())
                self.calls[attempt] += 1
                if context.attemptNumber() == 0 and self.calls[attempt] == 3:
                    Path(self.marker_dir, f"failed-{context.stageId()}").touch()
                    raise RuntimeError("injected failure on the first attempt")
            return self.net(x)

    return FailOnce()


@pytest.mark.slow
def test_parquet_write_is_exactly_once_when_a_task_is_retried(local_cluster_spark, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    model = make_failing_model(str(markers))
    df = feature_frame(local_cluster_spark, rows=90, partitions=3)
    output = str(tmp_path / "scored.parquet")
    scored = predict(df, model, "x", batch_size=5, passthrough_cols=["id"])
    scored.write.parquet(output)

    assert len(os.listdir(markers)) == 1, "the injected failure did not happen"
    written = local_cluster_spark.read.parquet(output).collect()
    ids, expected = torch_outputs(df, model.net)
    assert sorted(row.id for row in written) == list(range(90))  # none lost, none doubled
    by_id = {row.id: row.prediction for row in written}
    predicted = torch.tensor([by_id[i] for i in ids], dtype=torch.float32)
    torch.testing.assert_close(predicted, expected[:, 0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Spark Connect.


@pytest.mark.slow
def test_predict_over_spark_connect(connect_spark, model_files):
    df = feature_frame(connect_spark, rows=40)
    for kind in ("torch", "onnx"):
        rows = predict(df, model_files[kind], "x", batch_size=16).collect()
        ids, expected = torch_outputs(df, model_files["reference"])
        assert [row.id for row in rows] == ids == list(range(40))
        predicted = torch.tensor([row.prediction for row in rows])
        torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)
