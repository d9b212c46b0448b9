"""`predict` on streaming DataFrames: every query runs on real files and a real Spark session,
and stops on its own (``trigger(availableNow=True)`` with a bounded ``awaitTermination``).

The fast tier keeps the checks that start no query (errors before the start, the version
records); every test that runs a query or scores rows is marked slow."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path

import cloudpickle
import pytest
import torch

import deepspark as ds
from deepspark.data import FeedError
from deepspark.inference import (
    ModelInputError,
    ModelVersions,
    export_onnx,
    export_torchscript,
    idempotent_batch_writer,
    predict,
)

# Models defined here travel to Python workers that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FEATURES = 4
QUERY_TIMEOUT_S = 600  # a busy 2-core machine; a query that hangs fails the test instead


def write_input_files(spark, folder: Path, files: int, rows_per_file: int) -> None:
    """``files`` Parquet files of ``id, x`` under ``folder``, ids 0.. in file order."""
    for index in range(files):
        first = index * rows_per_file
        frame = spark.range(first, first + rows_per_file, 1, numPartitions=1).selectExpr(
            "id", *[f"cast(id * {k + 1} % 7 as float) as f{k}" for k in range(FEATURES)]
        )
        columns = ", ".join(f"f{k}" for k in range(FEATURES))
        frame = frame.selectExpr("id", f"array({columns}) as x")
        frame.write.parquet(str(folder / f"part-{index:03d}"))
        # the file source reads files, not directories: move the written file up
        (written,) = (folder / f"part-{index:03d}").glob("*.parquet")
        written.rename(folder / f"{index:03d}.parquet")


def input_stream(spark, folder: Path, files_per_batch: int = 1):
    schema = "id long, x array<float>"
    return (
        spark.readStream.schema(schema)
        .option("maxFilesPerTrigger", files_per_batch)
        .parquet(str(folder))
    )


def run_to_end(writer) -> None:
    """Start a query that processes every file there is, then stops; fail on its error."""
    query = writer.trigger(availableNow=True).start()
    try:
        finished = query.awaitTermination(QUERY_TIMEOUT_S)
    finally:
        query.stop()
    assert finished, "the streaming query did not finish in time"
    if query.exception() is not None:
        raise query.exception()


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    ).eval()


@pytest.fixture
def inputs(spark, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write_input_files(spark, folder, files=3, rows_per_file=40)
    return folder


# --------------------------------------------------------------------------------------------
# Every model kind, on a stream, gives the predictions of batch predict.


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch", "torchscript", "onnx"])
def test_a_stream_scores_like_a_batch_for_each_model_kind(spark, inputs, tmp_path, kind):
    model = make_mlp()
    if kind == "torchscript":
        model = export_torchscript(model, str(tmp_path / "model.pt"), torch.zeros(2, FEATURES))
    elif kind == "onnx":
        model = export_onnx(model, str(tmp_path / "model.onnx"), torch.zeros(2, FEATURES))
    shapes = None if kind == "onnx" else {"x": (FEATURES,)}  # ONNX declares its input shape
    stream = input_stream(spark, inputs)
    scored = predict(stream, model, "x", feature_shapes=shapes)
    assert scored.isStreaming and scored.columns == ["id", "x", "prediction"]
    out = tmp_path / "out"
    run_to_end(
        scored.writeStream.format("parquet")
        .option("path", str(out))
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
    )
    expected = predict(spark.read.parquet(str(inputs)), model, "x")
    got = {row.id: row.prediction for row in spark.read.parquet(str(out)).collect()}
    want = {row.id: row.prediction for row in expected.collect()}
    assert len(got) == 120 and got.keys() == want.keys()
    assert all(abs(got[key] - want[key]) < 1e-5 for key in want)


@pytest.mark.slow
def test_estimator_predict_takes_a_stream(spark, inputs, tmp_path):
    estimator = ds.Estimator.from_torch(model=make_mlp(seed=3))
    scored = estimator.predict(
        input_stream(spark, inputs), feature_cols="x", feature_shapes={"x": (FEATURES,)}
    )
    assert scored.isStreaming
    run_to_end(scored.writeStream.foreachBatch(idempotent_batch_writer(str(tmp_path / "out"))))
    rows = spark.read.parquet(str(tmp_path / "out")).select("id", "prediction").collect()
    assert sorted(row.id for row in rows) == list(range(120))


# --------------------------------------------------------------------------------------------
# Clear errors on the driver, before any query starts.


def test_a_model_or_column_mismatch_fails_before_the_query_starts(spark):
    stream = (
        spark.readStream.format("rate")
        .load()
        .selectExpr("value as id", f"array_repeat(cast(value as float), {FEATURES}) as x")
    )
    with pytest.raises(FeedError, match="feature_shapes"):
        predict(stream, make_mlp(), "x")  # no rows to read the array's length from
    with pytest.raises(ModelInputError, match=r"\(N, 4\)|mat1 and mat2"):
        predict(stream, make_mlp(), "x", feature_shapes={"x": (FEATURES + 1,)})
    with pytest.raises(FeedError, match="'features'.*available"):
        predict(stream, make_mlp(), "features", feature_shapes={"x": (FEATURES,)})
    assert spark.streams.active == []


# --------------------------------------------------------------------------------------------
# One load per Python worker, kept across micro-batches.


class LoadToken(torch.nn.Module):
    """Outputs, for every row, a token drawn when this copy was unpickled: one token per load,
    and the loading process's id in its thousands."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 1)
        self.token = 0.0

    def __setstate__(self, state):
        super().__setstate__(state)
        self.token = float(os.getpid() * 1000 + random.randrange(1000))

    def forward(self, x):
        return torch.full((x.shape[0], 1), self.token, dtype=torch.float64)


@pytest.mark.slow
def test_the_model_loads_once_per_python_worker_across_micro_batches(spark, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_input_files(spark, folder, files=6, rows_per_file=10)
    scored = predict(
        input_stream(spark, folder), LoadToken(), "x", feature_shapes={"x": (FEATURES,)}
    )
    out = tmp_path / "out"
    run_to_end(scored.writeStream.foreachBatch(idempotent_batch_writer(str(out))))
    rows = spark.read.parquet(str(out)).select("batch_id", "prediction").collect()
    batches_by_token = defaultdict(set)
    for row in rows:
        batches_by_token[row.prediction].add(row.batch_id)
    tokens_by_pid = Counter(int(token) // 1000 for token in batches_by_token)
    assert len({row.batch_id for row in rows}) == 6
    assert all(count == 1 for count in tokens_by_pid.values()), "a worker loaded twice"
    assert max(len(batches) for batches in batches_by_token.values()) >= 2, (
        "no Python worker kept its model for a second micro-batch"
    )


# --------------------------------------------------------------------------------------------
# Exactly once after a Python worker is killed mid-stream and the query restarts.


class DiesOnce(torch.nn.Module):
    """Doubles ``x[:, 0]``; kills its own Python worker the first time it sees row ``id``
    ``kill_at`` (a marker file makes it once)."""

    def __init__(self, kill_at: int, marker: str) -> None:
        super().__init__()
        self.kill_at, self.marker = kill_at, marker

    def forward(self, x):
        ids = x[:, 0]
        if bool((ids == self.kill_at).any()) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return ids.unsqueeze(1) * 2


def id_stream(spark, folder: Path):
    """The input files with ``x = [id]``, so the model sees the ids."""
    return input_stream(spark, folder).selectExpr("id", "array(cast(id as float)) as x")


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["parquet", "foreachBatch"])
def test_no_row_is_lost_or_written_twice_after_a_killed_worker(spark, tmp_path, sink):
    folder = tmp_path / "in"
    folder.mkdir()
    write_input_files(spark, folder, files=5, rows_per_file=20)
    out, checkpoint = tmp_path / "out", tmp_path / "checkpoint"
    marker = tmp_path / "killed"

    def writer():
        model = DiesOnce(kill_at=50, marker=str(marker))  # the middle of the third batch
        scored = predict(id_stream(spark, folder), model, "x", feature_shapes={"x": (1,)})
        if sink == "parquet":
            stream = scored.writeStream.format("parquet").option("path", str(out))
        else:
            stream = scored.writeStream.foreachBatch(idempotent_batch_writer(str(out)))
        return stream.option("checkpointLocation", str(checkpoint))

    with pytest.raises(Exception, match="(?i)python worker|crashed|exited"):
        run_to_end(writer())
    assert marker.exists()
    run_to_end(writer())  # restarted from the checkpoint
    rows = spark.read.parquet(str(out)).select("id", "prediction").collect()
    counts = Counter(row.id for row in rows)
    assert sorted(counts) == list(range(100)), "rows lost"
    assert set(counts.values()) == {1}, "rows written twice"
    assert all(row.prediction == 2 * row.id for row in rows)


@pytest.mark.slow
def test_idempotent_batch_writer_skips_a_committed_batch_and_clears_a_dead_attempt(spark, tmp_path):
    out = tmp_path / "out"
    write = idempotent_batch_writer(str(out))
    dead_attempt = out / "_staging" / "batch_id=0-deadbeef"
    dead_attempt.mkdir(parents=True)
    (dead_attempt / "part-0.parquet").write_bytes(b"half a file")
    write(spark.range(0, 5), 0)
    write(spark.range(100, 105), 0)  # a replay of batch 0: skipped
    write(spark.range(5, 8), 1)
    rows = spark.read.parquet(str(out)).collect()
    assert sorted((row.batch_id, row.id) for row in rows) == [
        *[(0, i) for i in range(5)],
        *[(1, i) for i in range(5, 8)],
    ]
    assert not dead_attempt.exists()


# --------------------------------------------------------------------------------------------
# A new model version is picked up at a micro-batch boundary, never inside one.


class Constant(torch.nn.Module):
    """Scores every row ``value``; on row ``id == publish_at`` renames ``staged`` to
    ``published`` (publishing the next version in the middle of a micro-batch)."""

    def __init__(self, value: float, publish_at: int = -1, staged: str = "", published: str = ""):
        super().__init__()
        self.value, self.publish_at = value, publish_at
        self.staged, self.published = staged, published

    def forward(self, x):
        seen = bool((x[:, 0] == self.publish_at).any())
        if seen and self.staged and os.path.exists(self.staged):
            os.rename(self.staged, self.published)
        return torch.full((x.shape[0], 1), self.value)


@pytest.mark.slow
def test_a_new_model_version_starts_at_a_batch_boundary(spark, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_input_files(spark, folder, files=6, rows_per_file=10)  # 3 batches of 2 tasks
    location = tmp_path / "models"
    staged = location / "_staged-2"
    ds.Estimator.from_torch(model=Constant(2.0)).save(str(staged))
    # version 1 publishes version 2 while it scores the second micro-batch (ids 20..39)
    first = Constant(1.0, publish_at=25, staged=str(staged), published=str(location / "2"))
    ds.Estimator.from_torch(model=first).save(str(location / "1"))

    stream = input_stream(spark, folder, files_per_batch=2).selectExpr(
        "id", "array(cast(id as float)) as x"
    )
    scored = predict(stream, ModelVersions(str(location)), "x", feature_shapes={"x": (1,)})
    assert scored.columns == ["id", "x", "prediction", "model_version"]
    out = tmp_path / "out"
    run_to_end(scored.writeStream.foreachBatch(idempotent_batch_writer(str(out))))
    rows = spark.read.parquet(str(out)).collect()
    assert sorted(row.id for row in rows) == list(range(60))
    versions_by_batch = defaultdict(set)
    for row in rows:
        versions_by_batch[row.batch_id].add(row.model_version)
        assert row.prediction == float(row.model_version)  # the row's version scored it
    assert all(len(names) == 1 for names in versions_by_batch.values()), versions_by_batch
    assert [versions_by_batch[batch].pop() for batch in sorted(versions_by_batch)] == [
        "1",
        "1",
        "2",
    ]


def test_model_versions_order_skip_hidden_and_incomplete_and_pin_each_batch(tmp_path):
    location = tmp_path / "models"
    location.mkdir()
    for version in ("2", "10", "9"):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), location / f"{version}.pt")
    (location / "11").mkdir()  # a directory still being written: no metadata.json yet
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), location / "_12.pt")
    versions = ModelVersions(str(location))
    assert versions.latest().name == "10"

    # every caller for one batch gets the version the first one recorded, from any thread
    chosen: list[str] = []
    threads = [
        threading.Thread(target=lambda: chosen.append(versions.for_batch("query", 7).name))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), location / "_20.pt")
    os.rename(location / "_20.pt", location / "20.pt")  # published whole, as the docs say
    for thread in threads:
        thread.join()
    assert len(set(chosen)) == 1 and len(chosen) == 8
    assert versions.for_batch("query", 7).name == chosen[0]  # a replay of the batch
    assert versions.for_batch("query", 8).name == "20"
    assert versions.for_batch("another-query", 7).name == "20"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["auto", "mapInArrow"])
def test_model_versions_on_a_batch_frame_score_with_the_newest(spark, tmp_path, path):
    location = tmp_path / "models"
    location.mkdir()
    for version, value in (("1", 1.0), ("2", 2.0)):
        ds.Estimator.from_torch(model=Constant(value)).save(str(location / version))
    frame = spark.range(0, 10).selectExpr("id", "array(cast(id as float)) as x")
    spark.conf.set("deepspark.predict.path", path)  # mapInArrow: Spark 3.5 and 4.0's path
    try:
        rows = predict(frame, ModelVersions(str(location)), "x").collect()
    finally:
        spark.conf.unset("deepspark.predict.path")
    assert {(row.prediction, row.model_version) for row in rows} == {(2.0, "2")}
    with pytest.raises(FileNotFoundError, match="not a directory"):
        predict(frame, ModelVersions(str(tmp_path / "missing")), "x")
