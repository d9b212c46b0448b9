"""`ds.cache`: a DataFrame converted to Arrow chunks once, on the executors' disks, reused by
later fits and evaluations; freed by `uncache`, by `stop_context`, and recomputed by Spark
after an executor is lost."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch

import _training_helpers as helpers
import deepspark as ds
from _training_helpers import DigitsNet, digits_frames
from deepspark.data import chunks
from deepspark.data.cache import cached_frame_of
from deepspark.data.chunks import (
    CHUNK_COLUMN,
    RANK_COLUMN,
    ROWS_COLUMN,
    SLICE_ROWS_COLUMN,
    SLICE_START_COLUMN,
    encode_for_ranks,
    encode_partition,
    rows_from_chunks,
)
from deepspark.training.driver.jobs import job_input
from deepspark.training.job_spec import SPLIT_COLUMN

# Spark's Python workers cannot import the tests folder: ship these by value.
cloudpickle.register_pickle_by_value(helpers)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPOCHS, BATCH, LR = 8, 64, 3e-3
TRAIN_ROWS = 1437  # digits_frames: 80 % of load_digits' 1,797 images


def _estimator(seed: int = 0) -> ds.Estimator:
    torch.manual_seed(seed)
    return ds.Estimator.from_torch(
        model=DigitsNet(),
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy"],
    )


def _counted(frame, marks: Path):
    """`frame`, whose every evaluation of a partition leaves one file in `marks`."""
    directory = str(marks)

    def count_evaluation(batches):
        import os
        import uuid

        with open(os.path.join(directory, uuid.uuid4().hex), "w") as mark:
            mark.write(os.getcwd())  # which executor evaluated it
        yield from batches

    return frame.mapInArrow(count_evaluation, frame.schema)


def _evaluations(marks: Path) -> int:
    return len(os.listdir(marks))


def _evaluated_under(marks: Path, work_dir: Path) -> int:
    """Evaluations that ran in an executor whose working directory is under `work_dir`."""
    return sum(path.read_text().startswith(str(work_dir)) for path in marks.iterdir())


def _chunk_rows(rows: pa.RecordBatch, **bounds) -> pa.RecordBatch:
    """A job's chunk rows for `rows` (one partition), the whole of each chunk, split 0."""
    cache_rows = list(encode_partition([rows], 0, **bounds))
    table = pa.Table.from_batches(cache_rows)
    return pa.RecordBatch.from_pydict(
        {
            CHUNK_COLUMN: table.column(CHUNK_COLUMN).combine_chunks(),
            SLICE_START_COLUMN: pa.array([0] * table.num_rows, pa.int32()),
            SLICE_ROWS_COLUMN: table.column(ROWS_COLUMN).combine_chunks(),
            SPLIT_COLUMN: pa.array([0] * table.num_rows, pa.int32()),
        }
    )


# --- the worker side, without Spark ------------------------------------------------------------


def test_chunks_are_bounded_and_decode_to_the_same_rows():
    values = np.arange(10_000, dtype=np.float64)
    rows = pa.RecordBatch.from_pydict({"x": values, "label": values.astype(np.int64) % 10})
    cache_rows = list(encode_partition([rows.slice(0, 3000), rows.slice(3000)], 5, chunk_rows=4096))
    counts = [batch.column(ROWS_COLUMN)[0].as_py() for batch in cache_rows]
    assert sum(counts) == 10_000 and max(counts) <= 4096
    by_bytes = list(encode_partition([rows], 5, chunk_bytes=16_000))
    assert max(len(b.column(CHUNK_COLUMN)[0].as_py()) for b in by_bytes) < 16_000 + 2_000

    decoded = pa.Table.from_batches(list(rows_from_chunks([_chunk_rows(rows)], ["x"])))
    assert decoded.column_names == ["x", SPLIT_COLUMN]
    assert np.array_equal(decoded.column("x").to_numpy(), values)
    assert set(decoded.column(SPLIT_COLUMN).to_pylist()) == {0}

    plain = pa.RecordBatch.from_pydict({"x": [1.0], SPLIT_COLUMN: pa.array([1], pa.int32())})
    assert list(rows_from_chunks([plain], ["x"])) == [plain]  # not chunk rows: unchanged

    (empty,) = encode_partition([], 3)  # an empty partition is still known to the cache
    assert empty.column(ROWS_COLUMN)[0].as_py() == 0


def test_a_slice_of_a_chunk_reads_its_rows_only_and_without_copies():
    values = np.arange(100, dtype=np.float64)
    rows = pa.RecordBatch.from_pydict({"x": values})
    job = _chunk_rows(rows)
    job = job.set_column(1, SLICE_START_COLUMN, pa.array([40], pa.int32()))
    job = job.set_column(2, SLICE_ROWS_COLUMN, pa.array([25], pa.int32()))
    (piece,) = rows_from_chunks([job], ["x"])
    assert piece.column(0).to_pylist() == list(values[40:65])
    # the decoded values point into the incoming chunk's buffer
    blob = job.column(CHUNK_COLUMN).buffers()[2]
    address = piece.column(0).buffers()[1].address
    assert blob.address <= address < blob.address + blob.size


def test_rows_converted_on_the_fly_are_dealt_evenly_over_the_ranks():
    rows = pa.RecordBatch.from_pydict({"x": np.arange(1001, dtype=np.float64)})
    dealt = list(encode_for_ranks([rows.slice(0, 500), rows.slice(500)], 1, 3, {"tag": 1}))
    per_rank = {}
    for batch in dealt:
        rank = batch.column(RANK_COLUMN)[0].as_py()
        per_rank[rank] = per_rank.get(rank, 0) + batch.column(SLICE_ROWS_COLUMN)[0].as_py()
    assert sorted(per_rank.values()) == [333, 334, 334]
    decoded = pa.Table.from_batches(list(rows_from_chunks(dealt)))
    assert sorted(decoded.column("x").to_pylist()) == list(range(1001))
    assert set(decoded.column("tag").to_pylist()) == {1}


def test_chunks_docstring_examples_run():
    failures, _ = doctest.testmod(chunks, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# --- local Spark ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cached_frame_is_converted_once_and_learns_like_the_frame(spark, tmp_path):
    train_df, test_df = digits_frames(spark)
    source = _counted(train_df, tmp_path)
    cached = ds.cache(source)
    try:
        assert (cached.rows, cached.chunks) == (TRAIN_ROWS, cached.partitions)
        assert cached.bytes > TRAIN_ROWS * 64 * 8
        converted = _evaluations(tmp_path)
        assert converted == cached.partitions  # one job, each partition once

        fit = {"feature_cols": "features", "label_cols": "label", "batch_size": BATCH}
        est = _estimator()
        history = est.fit(
            source, epochs=EPOCHS, validation_data=test_df, num_workers=2, seed=0, **fit
        )
        assert list(history["train_rows"]) == [TRAIN_ROWS] * EPOCHS  # every row once an epoch
        accuracy = history["val_accuracy"].iloc[-1]
        assert accuracy >= 0.95
        # one cached partition per rank: read where they are, without a shuffle
        second = _estimator().fit(source, epochs=1, num_workers=2, **fit)
        assert list(second["train_rows"]) == [TRAIN_ROWS]
        scores = est.evaluate(source, "features", "label", num_workers=2)
        assert scores["accuracy"] > 0.95
        # the column checks, the dry run, two fits and an evaluation read no row of the source
        assert _evaluations(tmp_path) == converted

        # the same rows under another plan are not the cache: read and converted as before
        other = source.where("label >= 0")
        assert cached_frame_of(other) is None
        plain = _estimator().fit(
            other, epochs=EPOCHS, validation_data=test_df, num_workers=2, seed=0, **fit
        )
        assert _evaluations(tmp_path) > converted
        assert list(plain["train_rows"]) == [TRAIN_ROWS] * EPOCHS
        assert abs(plain["val_accuracy"].iloc[-1] - accuracy) <= 0.03, (plain, history)
    finally:
        cached.unpersist()


def test_cached_rows_reach_every_rank_balanced_and_once(spark):
    train_df, test_df = digits_frames(spark)
    one_partition = train_df.coalesce(1)  # contiguous runs of a single partition's chunks
    cached = ds.cache(one_partition)
    try:
        data = job_input(
            one_partition,
            ["label"],
            2,
            split=0,
            validation=test_df,  # not cached: converted on the fly
            validation_split=1,
        )
        assert set(data.columns) >= {CHUNK_COLUMN, SPLIT_COLUMN}

        def per_rank(batches):
            from pyspark import BarrierTaskContext

            rank = BarrierTaskContext.get().partitionId()
            for batch in rows_from_chunks(batches, ["label"]):
                yield pa.RecordBatch.from_pydict(
                    {
                        "rank": pa.array([rank] * batch.num_rows, pa.int32()),
                        "split": batch.column(SPLIT_COLUMN),
                        "label": batch.column("label"),
                    }
                )

        got = data.mapInArrow(per_rank, "rank int, split int, label long", barrier=True).toPandas()
        counts = got.groupby(["split", "rank"]).size().to_dict()
        assert counts == {(0, 0): 718, (0, 1): 719, (1, 0): 180, (1, 1): 180}
        train_labels = sorted(got[got.split == 0].label)
        assert train_labels == sorted(r.label for r in train_df.select("label").collect())
        assert sorted(got[got.split == 1].label) == sorted(
            r.label for r in test_df.select("label").collect()
        )
    finally:
        cached.unpersist()


def test_uncache_frees_the_chunks(spark):
    from pyspark import StorageLevel

    def build():
        return spark.range(0, 5000, numPartitions=3).selectExpr(
            "CAST(id AS DOUBLE) AS x", "CAST(id % 2 AS INT) AS label"
        )

    df = build()
    cached = ds.cache(df)
    assert cached.storage_level == StorageLevel.DISK_ONLY
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == 1
    assert (cached.rows, cached.partitions) == (5000, 3)
    assert ds.cache(df) is cached  # already cached: the same handle
    assert cached_frame_of(build()) is cached  # the same plan, built again
    assert cached_frame_of(df.where("x > 3")) is None
    assert cached_frame_of(df.select("x")) is None
    assert ds.uncache(build()) is True
    assert cached.storage_level == StorageLevel.NONE
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()
    assert cached_frame_of(df) is None
    assert ds.uncache(df) is False

    again = ds.cache(df)
    assert again is not cached and cached_frame_of(df) is again
    again.unpersist()
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()


def test_max_bytes_over_the_data_drops_the_cache_with_the_size(spark):
    df = spark.range(0, 40_000, numPartitions=2).selectExpr("id", "id * 2 AS y")
    with pytest.raises(ValueError, match=r"partition \d alone .*more than max_bytes=1000\b"):
        ds.cache(df, max_bytes=1000)  # the first partition alone stops the job
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()
    # each partition fits (about 320 kB), the whole does not
    with pytest.raises(
        ValueError, match=r"takes \d+ bytes .*more than max_bytes=500000 \(488.3 KiB\)"
    ):
        ds.cache(df, max_bytes=500_000)
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()
    assert cached_frame_of(df) is None
    for bad in (0, -1, "1g", 1.5):
        with pytest.raises(ValueError, match="max_bytes must be a positive"):
            ds.cache(df, max_bytes=bad)
    fits = ds.cache(df, max_bytes=2_000_000)
    assert fits.bytes <= 2_000_000
    fits.unpersist()


@pytest.mark.slow
def test_stop_context_frees_every_cache(tmp_path):
    script = textwrap.dedent(
        """
        import deepspark as ds

        spark = ds.init_context(cores=1, app_name="cache-stop")
        jsc = spark.sparkContext._jsc.sc()
        df = spark.range(0, 1000, numPartitions=2).selectExpr("id", "id % 3 AS label")
        cached = ds.cache(df)
        own = spark.range(7).persist()  # the user's own cache: not deepspark's to free
        own.count()
        assert jsc.getPersistentRDDs().size() == 2
        ds.stop_context()
        print("left", jsc.getPersistentRDDs().size(), "active", cached.active)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left 1 active False" in done.stdout, done.stdout


# --- Spark Connect ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_over_spark_connect(connect_spark, tmp_path):
    from pyspark import StorageLevel

    train_df, _ = digits_frames(connect_spark)
    source = _counted(train_df, tmp_path)
    cached = ds.cache(source)
    try:
        assert cached.rows == TRAIN_ROWS
        converted = _evaluations(tmp_path)
        est = _estimator()
        history = est.fit(source, "features", "label", epochs=2, batch_size=BATCH, num_workers=2)
        assert list(history["train_rows"]) == [TRAIN_ROWS] * 2
        est.evaluate(source, "features", "label", num_workers=2)
        assert _evaluations(tmp_path) == converted
        assert cached.storage_level == StorageLevel.DISK_ONLY
    finally:
        cached.unpersist()
    assert cached.storage_level == StorageLevel.NONE


# --- a standalone cluster that loses an executor ----------------------------------------------


def _wait_for_executors(session, count: int, timeout_s: float = 120.0) -> None:
    tracker = session.sparkContext._jsc.sc()
    deadline = time.monotonic() + timeout_s
    while tracker.getExecutorMemoryStatus().size() != count + 1:  # with the driver
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {count} executors within {timeout_s} s")
        time.sleep(0.25)


def _executor_process(work_dir: Path) -> psutil.Process:
    """The executor JVM that a standalone Worker started under `work_dir`."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "CoarseGrainedExecutorBackend" not in cmdline:
            continue
        try:
            if process.cwd().startswith(str(work_dir)):
                return process
        except psutil.Error:
            continue
    raise RuntimeError(f"no executor process runs under {work_dir}")


@pytest.mark.slow
def test_cached_fit_after_a_lost_executor_trains_every_row(
    standalone_spark, standalone_cluster, tmp_path
):
    spark = standalone_spark
    _wait_for_executors(spark, 2)
    train_df, _ = digits_frames(spark)
    source = _counted(train_df.repartition(4), tmp_path)
    cached = ds.cache(source)
    try:
        converted = _evaluations(tmp_path)
        # lose the executor that converted the most partitions; its disk blocks go with it
        work_dir = max(
            standalone_cluster.work_dirs, key=lambda path: _evaluated_under(tmp_path, path)
        )
        lost = _evaluated_under(tmp_path, work_dir)
        assert lost >= 1
        executor = _executor_process(work_dir)
        executor.kill()
        executor.wait(timeout=30)
        # the Worker starts a new executor; wait until it registered
        deadline = time.monotonic() + 120
        while _executor_process_or_none(work_dir, executor.pid) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the Worker did not start a new executor")
            time.sleep(0.5)
        _wait_for_executors(spark, 2)

        history = _estimator().fit(
            source, "features", "label", epochs=2, batch_size=BATCH, num_workers=2, seed=0
        )
        assert list(history["train_rows"]) == [TRAIN_ROWS] * 2
        # Spark recomputed the lost blocks from the source, and only those
        assert _evaluations(tmp_path) - converted == lost
    finally:
        cached.unpersist()


def _executor_process_or_none(work_dir: Path, lost_pid: int) -> psutil.Process | None:
    try:
        process = _executor_process(work_dir)
    except RuntimeError:
        return None
    return None if process.pid == lost_pid else process
