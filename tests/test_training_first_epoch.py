"""The first epoch trained while the partition arrives, and the rendezvous through the driver.

The window agreement and the streaming spill are tested without Spark (random arrival
schedules against the plan over known counts); the order of events (a first step before the
partition was read to its end) on a real Spark fit whose input holds its second half back until
a rank has stepped.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from pyspark import cloudpickle as pyspark_cloudpickle

import deepspark as ds
from deepspark.data import FeedError, TensorSpec, plan_steps
from deepspark.data.stream import StreamingSpill, WindowFeed
from deepspark.training.callbacks import Callback
from deepspark.training.driver.progress_server import ProgressServer
from deepspark.training.rank.first_epoch import (
    MAX_WINDOW_BATCHES,
    window_plan,
    window_report,
    window_rows,
)
from deepspark.training.rank.progress_client import ProgressClient

# --- the window agreement, against the plan over known counts --------------------------------


def _simulate(rows, batch_size, policy, seed, windows=None):
    """Windows over random arrival; returns the real rows per step per rank. `windows`, if a
    list, receives each window's steps."""
    rng = np.random.default_rng(seed)
    world = len(rows)
    sizes = plan_steps([1] * world, batch_size).local_batch_sizes
    arrived = [0] * world  # rows delivered so far
    taken = [0] * world
    steps = []
    for number in itertools.count():
        # every rank waits for its window's rows or its end; arrival goes on in random chunks
        # meanwhile, and may overshoot by any amount
        reports = []
        for rank in range(world):
            wanted = window_rows(number, sizes[rank])
            while arrived[rank] - taken[rank] < wanted and arrived[rank] < rows[rank]:
                arrived[rank] = min(rows[rank], arrived[rank] + int(rng.integers(1, 400)))
            queued, ended = arrived[rank] - taken[rank], arrived[rank] == rows[rank]
            reports.append(window_report(queued, ended, wanted))
        window, last = window_plan(reports, sizes, policy)
        if windows is not None:
            windows.append(window)
        for step in window:
            for rank in range(world):
                assert step[rank] <= sizes[rank]
                taken[rank] += step[rank]
                assert taken[rank] <= arrived[rank], "a rank trained rows it did not have"
            steps.append(step)
        if last or not window:
            return steps


@pytest.mark.parametrize("seed", range(20))
def test_pad_windows_train_every_row_once_in_the_planned_number_of_steps(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(1, 5))
    rows = [int(rng.integers(0, 300)) for _ in range(world)]
    rows[0] = max(rows[0], 1)
    batch_size = int(rng.integers(world, 64))
    steps = _simulate(rows, batch_size, "pad", seed)
    plan = plan_steps(rows, batch_size, "pad")
    assert len(steps) == plan.steps_per_epoch
    assert [sum(step[r] for step in steps) for r in range(world)] == rows
    assert [sum(step) for step in steps] == [plan.global_real_rows(s) for s in range(len(steps))]


@pytest.mark.parametrize("seed", range(20))
def test_drop_windows_stop_where_the_plan_stops(seed):
    rng = np.random.default_rng(100 + seed)
    world = int(rng.integers(1, 5))
    batch_size = int(rng.integers(world, 32))
    rows = [int(rng.integers(batch_size, 300)) for _ in range(world)]
    steps = _simulate(rows, batch_size, "drop", seed)
    plan = plan_steps(rows, batch_size, "drop")
    assert len(steps) == plan.steps_per_epoch
    assert all(step == list(plan.local_batch_sizes) for step in steps)


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_the_windows_follow_from_the_input_not_from_when_its_rows_arrive(policy):
    """The same rows, arriving in other chunks at other moments, give the same windows: the
    same rows are shuffled together in the same steps, so a seeded fit repeats exactly."""
    rows, batch_size = [2000, 1500, 1999], 48
    seen = []
    for arrival in range(5):
        windows: list = []
        _simulate(rows, batch_size, policy, seed=arrival, windows=windows)
        seen.append(windows)
    assert all(windows == seen[0] for windows in seen[1:])
    assert len(seen[0]) > 3  # windows grow: a first batch, then 2, 4, ... up to the bound
    assert max(len(window) for window in seen[0]) <= MAX_WINDOW_BATCHES


def test_a_report_never_says_more_than_the_window_waited_for():
    assert window_report(1000, False, 64) == (64, False)
    assert window_report(64, True, 64) == (64, False)  # the next window finds the end
    assert window_report(7, True, 64) == (7, True)
    with pytest.raises(FeedError, match="fewer than the 64 waited for"):
        window_report(7, False, 64)


def test_window_plan_refuses_wrap():
    with pytest.raises(ValueError, match="wrap"):
        window_plan([(4, True)], [2], "wrap")


# --- the streaming spill -----------------------------------------------------------------------


def _batches(count, rows, pulled=None):
    for index in range(count):
        if pulled is not None:
            pulled.append(index)
        values = np.arange(index * rows, (index + 1) * rows, dtype=np.float32)
        split = (values % 5 == 0).astype(np.int32)  # every fifth row is validation
        yield pa.record_batch({"x": values, "y": values.astype(np.int64), "s": split})


def test_streaming_spill_hands_out_train_rows_and_spills_every_split():
    stream = StreamingSpill(_batches(10, 100), split_column="s")
    seen = []
    while True:
        queued, ended = stream.wait_rows(64, timeout_s=30)
        seen.extend(
            v for part in stream.take(min(queued, 64)) for v in part.column("x").to_pylist()
        )
        if ended and queued <= 64:
            break
    with stream.finish(timeout_s=30) as spill:
        assert spill.num_rows(0) == 800 and spill.num_rows(1) == 200
    assert sorted(seen) == [float(v) for v in range(1000) if v % 5]


def test_streaming_spill_reads_ahead_only_to_its_bound():
    pulled: list[int] = []
    one_batch = next(_batches(1, 1000)).nbytes
    stream = StreamingSpill(
        _batches(50, 1000, pulled), split_column="s", max_queued_bytes=3 * one_batch
    )
    stream.wait_rows(10, timeout_s=30)
    deadline = time.monotonic() + 30
    while len(pulled) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room to read on, were the bound not kept
    assert len(pulled) <= 6, f"the reader ran ahead to batch {len(pulled)} of 50"
    stream.take(10_000)
    with stream.finish(timeout_s=60) as spill:  # stops feeding: the rest is spilled only
        assert spill.num_rows(0) + spill.num_rows(1) == 50_000
    assert len(pulled) == 50


def _trickle(count, pause_s, stall_after=None):
    """One row a batch, `pause_s` apart; after `stall_after` rows, a long silence."""
    for index in range(count):
        if index == stall_after:
            time.sleep(30)
        time.sleep(pause_s)
        yield pa.record_batch({"x": [float(index)], "s": [0]})


def test_a_slow_input_that_keeps_arriving_fills_a_large_window_but_a_silent_one_times_out():
    # 20 rows over about 1.2 s fill a window of 20 within a timeout of 0.5 s: rows keep coming
    stream = StreamingSpill(_trickle(20, 0.06), split_column="s")
    queued, _ = stream.wait_rows(20, timeout_s=0.5)
    assert queued == 20
    stream.close()
    # 3 rows, then 30 s of nothing: the wait ends after 0.5 s of silence, saying what it had
    stalled = StreamingSpill(_trickle(10, 0.01, stall_after=3), split_column="s")
    with pytest.raises(TimeoutError, match=r"no row in 0.5 s, with 3 of the 8 the rank waits"):
        stalled.wait_rows(8, timeout_s=0.5)
    stalled.close()


def test_streaming_spill_passes_on_the_input_error_and_removes_its_files(tmp_path):
    def failing():
        yield from _batches(2, 10)
        raise ValueError("the source broke")

    stream = StreamingSpill(failing(), tmp_path, split_column="s")
    with pytest.raises(ValueError, match="the source broke"):
        while not stream.wait_rows(10_000, timeout_s=30)[1]:
            pass
    with pytest.raises(ValueError, match="the source broke"):
        stream.finish(timeout_s=30)
    assert not list(tmp_path.iterdir())


def test_window_feed_fills_short_batches_with_repeated_real_rows():
    feed = WindowFeed(
        TensorSpec("x", "scalar"), TensorSpec("y", "scalar", dtype="int64"), seed=1, epoch=0, rank=0
    )
    first = list(feed.window([next(_batches(1, 6))], [4, 2], 4))
    assert [b.num_real for b in first] == [4, 2]
    assert sorted(v for b in first for v in b.labels[0][: b.num_real].tolist()) == list(range(6))
    assert set(first[1].labels[0].tolist()) <= set(range(6))
    # a window without rows for this rank: filler from the first rows it saw
    empty = list(feed.window([], [0], 4))
    assert empty[0].num_real == 0 and set(empty[0].labels[0].tolist()) <= set(range(6))


# --- the rendezvous through the driver's channel -------------------------------------------------


def test_rendezvous_through_the_driver_answers_every_rank_in_rank_order():
    with ProgressServer(host="127.0.0.1", max_connections=3) as server:
        answers = {}

        def meet(rank):
            with ProgressClient(server.address, server.token, rank=rank) as client:
                answers[rank] = client.exchange(
                    {"rank": rank, "port": 100 + rank}, attempt=1, world_size=3, timeout_s=30
                )

        threads = [threading.Thread(target=meet, args=(rank,)) for rank in (2, 0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    expected = [{"rank": r, "port": 100 + r} for r in range(3)]
    assert answers == {0: expected, 1: expected, 2: expected}
    assert server.rendezvous_done == 1
    assert not server.events("hello"), "hellos are not progress history"


def test_rendezvous_with_a_missing_rank_times_out_with_a_clear_error():
    with (
        ProgressServer(host="127.0.0.1") as server,
        ProgressClient(server.address, server.token, rank=0) as client,
        pytest.raises(TimeoutError, match="not every rank reached the rendezvous"),
    ):
        client.exchange({"rank": 0}, attempt=1, world_size=2, timeout_s=1.5)


def test_a_later_attempt_replaces_the_stragglers_of_an_earlier_one():
    with ProgressServer(host="127.0.0.1") as server:
        stale = ProgressClient(server.address, server.token, rank=0)
        with pytest.raises(TimeoutError):
            stale.exchange({"attempt": 1}, attempt=1, world_size=2, timeout_s=1.0)
        results = {}

        def meet(rank):
            with ProgressClient(server.address, server.token, rank=rank) as client:
                results[rank] = client.exchange(
                    {"attempt": 2, "rank": rank}, attempt=2, world_size=2, timeout_s=30
                )

        threads = [threading.Thread(target=meet, args=(rank,)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stale.close()
    assert results[0] == results[1] == [{"attempt": 2, "rank": 0}, {"attempt": 2, "rank": 1}]


def test_rendezvous_refuses_an_answer_signed_with_another_token():
    with ProgressServer(host="127.0.0.1", token="a" * 64) as server:
        # the client holds a different secret: the server rejects its hello and closes
        with (
            ProgressClient(server.address, "b" * 64, rank=0) as client,
            pytest.raises((ConnectionError, TimeoutError)),
        ):
            client.exchange({}, attempt=1, world_size=1, timeout_s=5)
        assert server.rejected == 1


# --- on Spark: the first step comes before the partition's end ----------------------------------

ROWS_PER_PART = 12_000  # more than one Arrow batch (10,000 rows) per partition


class _GateThenRest:
    """A source that yields the first 10,000 rows of its partition, then holds the rest back
    until a training rank has taken a step (the marker file), or 120 s pass."""

    def __init__(self, marker: str, log: str) -> None:
        self.marker = marker
        self.log = log

    def __call__(self, batches):
        table = pa.Table.from_batches(list(batches))
        yield from table.slice(0, 10_000).to_batches()
        deadline = time.monotonic() + 120
        while not os.path.exists(self.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(self.log, "a") as handle:
            handle.write("released by a step\n" if os.path.exists(self.marker) else "timeout\n")
        yield from table.slice(10_000).to_batches()


class _MarkFirstStep(Callback):
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_batch_end(self, state) -> None:
        if not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(f"rank {state.rank} epoch {state.epoch} step {state.step}\n")


@pytest.mark.slow
def test_the_first_step_comes_before_the_partition_is_read(spark, tmp_path):
    marker, log = str(tmp_path / "stepped"), str(tmp_path / "gate.log")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * ROWS_PER_PART, 8)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64)
    frame = pd.DataFrame({"features": list(x), "label": y})
    source = spark.createDataFrame(frame, "features array<float>, label long")
    source = source.repartition(2).cache()
    assert source.count() == 2 * ROWS_PER_PART
    gated = source.mapInArrow(_GateThenRest(marker, log), source.schema)
    est = ds.Estimator.from_torch(
        model=torch.nn.Sequential(torch.nn.Linear(8, 2)),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
    )
    history = est.fit(
        gated,
        "features",
        "label",
        epochs=2,
        batch_size=256,
        num_workers=2,
        callbacks=[_MarkFirstStep(marker)],
        progress=False,
    )
    source.unpersist()
    # both partitions were held back until a rank stepped: the step came first
    with open(log) as gate, open(marker) as stepped:
        released = gate.read().splitlines()  # the fit's two tasks; the driver's look at the
        # first rows may add a line (its task ends after 8 rows, before the gate)
        assert len(released) >= 2 and set(released) == {"released by a step"}, released
        assert " epoch 0 step 0" in stepped.read()
    # and the streamed epoch still trained every row exactly once, like the spilled one after it
    assert history["train_rows"].tolist() == [2 * ROWS_PER_PART] * 2


# Spark's Python workers cannot import the tests folder: ship this module's classes by value,
# through the cloudpickle the estimator uses and the copy inside pyspark (mapInArrow's).
cloudpickle.register_pickle_by_value(sys.modules[__name__])
pyspark_cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_a_fit_meets_through_the_driver_not_spark_barrier_calls(spark, monkeypatch):
    hellos = []
    original = ProgressServer._hello

    def counting(self, peer, event):
        hellos.append((event["rank"], event["attempt"]))
        original(self, peer, event)

    monkeypatch.setattr(ProgressServer, "_hello", counting)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    frame = pd.DataFrame({"features": list(x), "label": (x[:, 0] > 0).astype(np.int64)})
    df = spark.createDataFrame(frame, "features array<float>, label long")
    est = ds.Estimator.from_torch(
        model=torch.nn.Linear(4, 2),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
    )
    est.fit(df, "features", "label", epochs=1, batch_size=32, num_workers=2, progress=False)
    assert sorted(hellos) == [(0, 1), (1, 1)]
