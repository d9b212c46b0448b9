"""The worker-side feed on plain pyarrow batches: spills, epochs, shuffles, the Dataset face."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from deepspark.data import (
    ArrowPartitionDataset,
    FeedError,
    PartitionSpill,
    TensorSpec,
    iter_batches,
    plan_steps,
)

X = TensorSpec("x", "array", (2, 2))
ID = TensorSpec("id", "scalar", dtype="int64")
# Small blocks and windows, so that a few thousand rows already span many of both.
SMALL = {"block_bytes": 2048}
WINDOW = 16 * 1024


def make_batches(rows: int, *, start: int = 0, batch_rows: int = 300, splits: int = 0):
    """Input like a task receives: `id` numbers the rows, `x` repeats it (checks alignment)."""
    for first in range(start, start + rows, batch_rows):
        ids = np.arange(first, min(first + batch_rows, start + rows), dtype=np.int64)
        values = np.repeat(ids.astype(np.float32), 4)
        offsets = np.arange(0, values.size + 1, 4, dtype=np.int32)
        columns = {
            "id": pa.array(ids),
            "x": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        }
        if splits:
            columns["split"] = pa.array((ids % splits).astype(np.int32))
        yield pa.record_batch(columns)


def epoch_batches(spill, plan, rank, epoch=0, seed=0, **kwargs):
    kwargs.setdefault("shuffle_window_bytes", WINDOW)
    return list(spill.epoch([X], [ID], plan=plan, rank=rank, epoch=epoch, seed=seed, **kwargs))


def ids_of(batches, real_only=True):
    parts = [b.labels[0][: b.num_real] if real_only else b.labels[0] for b in batches]
    return torch.cat(parts).tolist() if parts else []


def assert_aligned(batch):
    """Every row's features belong to its id: the gather moved all columns together."""
    ids = batch.labels[0].to(torch.float32)
    assert torch.equal(batch.features[0].reshape(len(batch), 4), ids[:, None].expand(-1, 4))


@pytest.fixture
def spills(tmp_path):
    """Spills of uneven partitions (1000, 313 and 0 rows), as three ranks would hold them."""
    sizes = [1000, 313, 0]
    opened = []
    start = 0
    for rows in sizes:
        opened.append(PartitionSpill.write(make_batches(rows, start=start), tmp_path, **SMALL))
        start += rows
    yield opened
    for spill in opened:
        spill.close()


# --- steps and policies -------------------------------------------------------------------


def test_pad_uses_every_row_once_with_equal_steps_on_uneven_and_empty_ranks(spills):
    plan = plan_steps([s.num_rows() for s in spills], 96, "pad")
    offsets = [0, 1000, 1313]
    for rank, spill in enumerate(spills):
        batches = epoch_batches(spill, plan, rank)
        assert len(batches) == plan.steps_per_epoch
        for step, batch in enumerate(batches):
            assert len(batch) == plan.local_batch_sizes[rank]
            assert batch.num_real == plan.real_rows(rank, step)
            assert batch.features[0].shape == (plan.local_batch_sizes[rank], 2, 2)
            if spill.num_rows():
                assert_aligned(batch)
        real = ids_of(batches)
        expected = list(range(offsets[rank], offsets[rank] + spill.num_rows()))
        assert sorted(real) == expected  # every row exactly once
        if spill.num_rows():  # filler repeats rows of this partition
            filler = set(ids_of(batches, real_only=False)) - set(real)
            assert filler == set()
        else:  # an empty partition yields zeros of the declared shape
            assert all(b.num_real == 0 and not b.features[0].any() for b in batches)


def test_drop_yields_full_batches_without_repeats(spills):
    plan = plan_steps([s.num_rows() for s in spills[:2]], 96, "drop")
    assert plan.steps_per_epoch == 313 // 48
    for rank, spill in enumerate(spills[:2]):
        batches = epoch_batches(spill, plan, rank)
        assert len(batches) == plan.steps_per_epoch
        assert all(len(b) == b.num_real == 48 for b in batches)
        ids = ids_of(batches)
        assert len(set(ids)) == len(ids)
        for batch in batches:
            assert_aligned(batch)


def test_wrap_fills_every_batch_with_real_rows(spills):
    plan = plan_steps([s.num_rows() for s in spills], 96, "wrap")
    batches = epoch_batches(spills[1], plan, 1)
    assert len(batches) == plan.steps_per_epoch
    assert all(b.num_real == len(b) == 32 for b in batches)
    ids = ids_of(batches)
    assert set(ids) == set(range(1000, 1313))  # all rows, some of them twice or more
    assert len(ids) == plan.steps_per_epoch * 32 > 313
    empty = epoch_batches(spills[2], plan, 2)
    assert len(empty) == plan.steps_per_epoch and all(b.num_real == 0 for b in empty)


def test_a_tiny_partition_repeats_within_one_batch(tmp_path):
    with PartitionSpill.write(make_batches(3), tmp_path) as spill:
        plan = plan_steps([3, 500], 200, "pad")
        batches = epoch_batches(spill, plan, 0, seed=4)
        assert len(batches) == 5 and [b.num_real for b in batches] == [3, 0, 0, 0, 0]
        assert set(ids_of(batches, real_only=False)) == {0, 1, 2}
        assert all(len(b) == 100 for b in batches)


def test_the_plan_must_match_the_spill(spills):
    plan = plan_steps([999, 313, 0], 96)
    with pytest.raises(FeedError, match="plan counts 999 rows for rank 0, but its spill holds"):
        epoch_batches(spills[0], plan, 0)
    with pytest.raises(FeedError, match="rank=3 is outside"):
        epoch_batches(spills[0], plan, 3)


# --- shuffling ------------------------------------------------------------------------------


def test_shuffle_is_reproducible_and_new_each_epoch(spills):
    spill = spills[0]
    plan = plan_steps([spill.num_rows()], 50)

    def order(**kwargs):
        return ids_of(epoch_batches(spill, plan, 0, **kwargs))

    first = order(epoch=0, seed=1)
    assert sorted(first) == list(range(1000))
    assert order(epoch=0, seed=1) == first  # same seed and epoch: same order
    assert order(epoch=1, seed=1) != first  # a new order every epoch
    assert order(epoch=0, seed=2) != first
    assert order(epoch=0, seed=1, shuffle=False) == list(range(1000))


def test_shuffle_mixes_rows_across_blocks_and_windows(tmp_path):
    rows = 20_000
    with PartitionSpill.write(make_batches(rows, batch_rows=5000), tmp_path, **SMALL) as spill:
        plan = plan_steps([rows], 256)
        batches = epoch_batches(spill, plan, 0, seed=3)
        ids = np.array(ids_of(batches))
        # ~64 rows per 2 KiB block; a 16 KiB window holds 8 blocks drawn at random.
        first = ids[:256]
        assert len(np.unique(first // 64)) >= 6
        assert first.max() - first.min() > rows // 4
        # Position in the epoch tells (almost) nothing about position in the partition.
        rank_correlation = np.corrcoef(np.arange(rows), ids)[0, 1]
        assert abs(rank_correlation) < 0.1
        # With a window as large as the partition the shuffle is uniform: the first batch
        # spreads over the whole partition.
        whole = epoch_batches(spill, plan, 0, seed=3, shuffle_window_bytes=64 << 20)
        first = np.array(ids_of(whole)[:256])
        assert np.histogram(first, bins=4, range=(0, rows))[0].min() > 30


# --- ordered passes and splits ------------------------------------------------------------


def test_ordered_pass_keeps_order_with_a_partial_last_batch(tmp_path):
    with PartitionSpill.write(make_batches(1000), tmp_path, **SMALL) as spill:
        batches = list(spill.ordered([X], [ID], batch_size=64, window_bytes=WINDOW))
    assert [len(b) for b in batches] == [64] * 15 + [40]
    assert all(b.num_real == len(b) for b in batches)
    assert ids_of(batches) == list(range(1000))
    for batch in batches:
        assert_aligned(batch)


def test_split_column_separates_train_and_validation(tmp_path):
    with PartitionSpill.write(make_batches(900, splits=3), tmp_path, split_column="split") as spill:
        assert spill.splits == (0, 1, 2)
        assert [spill.num_rows(s) for s in (0, 1, 2, 5)] == [300, 300, 300, 0]
        assert "split" not in spill.schema.names
        validation = ids_of(spill.ordered([X], [ID], batch_size=128, split=1))
        assert validation == list(range(1, 900, 3))
        plan = plan_steps([spill.num_rows(0)], 64)
        train = ids_of(epoch_batches(spill, plan, 0, split=0))
        assert sorted(train) == list(range(0, 900, 3))
        assert list(spill.ordered([X], [ID], batch_size=8, split=5)) == []


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([0, None, 1]), "1 null values"),
        (pa.array([0.0, 1.0, 1.0]), "must hold integers"),
        (pa.array([0, -1, 1]), "split numbers are >= 0"),
    ],
)
def test_bad_split_columns_are_refused(tmp_path, column, match):
    batch = pa.record_batch({"id": [1, 2, 3], "s": column})
    with pytest.raises(FeedError, match=match):
        PartitionSpill.write([batch], tmp_path, split_column="s")
    with pytest.raises(FeedError, match="'nope' is not in the data; available columns: id, s"):
        PartitionSpill.write([batch], tmp_path, split_column="nope")
    assert list(tmp_path.iterdir()) == []


# --- checks before the first batch ----------------------------------------------------------


def test_nulls_anywhere_in_the_partition_are_refused_before_the_first_batch(tmp_path):
    def batches():
        yield from make_batches(600)
        yield pa.record_batch(
            {
                "id": pa.array([600, None, None], pa.int64()),
                "x": pa.array([[0.0] * 4] * 3, pa.list_(pa.float32())),
            }
        )

    with PartitionSpill.write(batches(), tmp_path) as spill:
        plan = plan_steps([spill.num_rows()], 32)
        with pytest.raises(FeedError, match=r"'id' has 2 null values among this partition's 603"):
            spill.epoch([X], [ID], plan=plan, rank=0, epoch=0, seed=0)


def test_ragged_rows_in_a_late_block_are_refused_before_the_first_batch(tmp_path):
    def batches():
        yield from make_batches(2000)
        yield pa.record_batch(
            {"id": pa.array([2000], pa.int64()), "x": pa.array([[1.0] * 3], pa.list_(pa.float32()))}
        )

    with PartitionSpill.write(batches(), tmp_path, **SMALL) as spill:
        plan = plan_steps([spill.num_rows()], 32)
        with pytest.raises(FeedError, match=r"'x' is ragged: expected arrays of length 4"):
            spill.epoch([X], [ID], plan=plan, rank=0, epoch=0, seed=0)
        inferred = TensorSpec("x", "array")
        with pytest.raises(FeedError, match="'x' is ragged"):
            spill.ordered([inferred], batch_size=32)


def test_shapes_left_open_are_taken_from_the_spilled_data(tmp_path):
    with PartitionSpill.write(make_batches(100), tmp_path) as spill:
        plan = plan_steps([100], 10)
        open_shape = TensorSpec("x", "array")
        batch = next(spill.epoch(open_shape, ID, plan=plan, rank=0, epoch=0, seed=0))
        assert batch.features[0].shape == (10, 4)


def test_binary_columns_are_decoded_per_batch_from_the_spill(tmp_path):
    ids = np.arange(200)
    batch = pa.record_batch(
        {"id": pa.array(ids), "img": [np.full(3, i, np.int16).tobytes() for i in ids]}
    )
    image = TensorSpec("img", "binary", (3,), decode=lambda b: np.frombuffer(b, np.int16))
    with PartitionSpill.write([batch], tmp_path, block_bytes=256) as spill:
        plan = plan_steps([200], 16)
        batches = list(
            spill.epoch(image, ID, plan=plan, rank=0, epoch=0, seed=0, shuffle_window_bytes=512)
        )
    for b in batches:
        assert torch.equal(b.features[0][:, 0], b.labels[0].to(torch.float32))
    assert sorted(ids_of(batches)) == list(range(200))


# --- lifetime of spill files ----------------------------------------------------------------


def test_spill_files_are_removed_after_success_and_after_an_error(tmp_path):
    with PartitionSpill.write(make_batches(100), tmp_path) as spill:
        directory = Path(spill.directory)
        assert directory.parent == tmp_path and any(directory.glob("*.arrow"))
    assert not directory.exists()

    with (
        pytest.raises(RuntimeError, match="model exploded"),
        PartitionSpill.write(make_batches(100), tmp_path) as spill,
    ):
        directory = Path(spill.directory)
        plan = plan_steps([100], 10)
        for step, _ in enumerate(epoch_batches(spill, plan, 0)):
            if step == 3:
                raise RuntimeError("model exploded")
    assert not directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_input_leaves_no_files(tmp_path):
    def broken():
        yield from make_batches(500)
        raise ConnectionError("the JVM went away")

    with pytest.raises(ConnectionError):
        PartitionSpill.write(broken(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_spill_goes_under_spark_local_dirs(tmp_path, monkeypatch):
    local = tmp_path / "blockmgr"
    local.mkdir()
    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(local))
    with PartitionSpill.write(make_batches(10)) as spill:
        assert Path(spill.directory).parent == local
    assert list(local.iterdir()) == []


def test_a_pickled_copy_reads_the_files_but_does_not_remove_them(tmp_path):
    with PartitionSpill.write(make_batches(50), tmp_path) as spill:
        copy = pickle.loads(pickle.dumps(spill))
        assert ids_of(copy.ordered([X], [ID], batch_size=20)) == list(range(50))
        copy.close()
        assert os.path.isdir(spill.directory)
        assert ids_of(spill.ordered([X], [ID], batch_size=20)) == list(range(50))
    with pytest.raises(FeedError, match="closed"):
        spill.ordered([X], [ID], batch_size=20)


# --- iter_batches (inference) -------------------------------------------------------------


def test_iter_batches_keeps_order_across_input_batches():
    batches = list(iter_batches(make_batches(1000, batch_rows=300), [X], [ID], batch_size=128))
    assert [len(b) for b in batches] == [128] * 7 + [104]
    assert ids_of(batches) == list(range(1000))
    for batch in batches:
        assert_aligned(batch)
    no_labels = list(iter_batches(make_batches(10), X, batch_size=4))
    assert no_labels[0].labels == () and [len(b) for b in no_labels] == [4, 4, 2]


def test_iter_batches_shares_memory_with_the_input_within_an_input_batch():
    source = list(make_batches(300, batch_rows=300))
    address = source[0].column("x").values.buffers()[1].address
    first, second = list(iter_batches(source, [X], batch_size=200))
    assert first.features[0].data_ptr() == address
    assert second.features[0].data_ptr() == address + 200 * 4 * 4


# --- the Dataset face ---------------------------------------------------------------------


def test_dataset_over_a_spill_gives_shuffled_epochs_for_a_dataloader(tmp_path):
    with PartitionSpill.write(make_batches(1000), tmp_path, **SMALL) as spill:
        dataset = ArrowPartitionDataset(spill, X, ID, batch_size=64, seed=5)
        assert len(dataset) == 16
        loader = DataLoader(dataset, batch_size=None)
        epoch0 = [y for _, y in loader]
        assert [len(y) for y in epoch0] == [64] * 15 + [40]  # the last batch holds the rest
        assert sorted(torch.cat(epoch0).tolist()) == list(range(1000))
        again = [y for _, y in loader]
        assert torch.cat(again).tolist() == torch.cat(epoch0).tolist()  # same epoch, same order
        dataset.set_epoch(1)
        epoch1 = [y for _, y in loader]
        assert torch.cat(epoch1).tolist() != torch.cat(epoch0).tolist()
        dataset.drop_last = True
        assert [len(y) for _, y in loader] == [64] * 15


def test_dataset_workers_yield_the_same_sequence_as_one_process(tmp_path):
    with PartitionSpill.write(make_batches(700), tmp_path, **SMALL) as spill:
        dataset = ArrowPartitionDataset(spill, [X], [ID], batch_size=50, seed=2)
        alone = [y.tolist() for _, y in DataLoader(dataset, batch_size=None)]
        workers = DataLoader(dataset, batch_size=None, num_workers=2)
        together = [y.tolist() for _, y in workers]
    assert together == alone


def test_dataset_over_a_table_is_an_ordered_pass():
    table = pa.Table.from_batches(list(make_batches(10)))
    dataset = ArrowPartitionDataset(table, X, batch_size=4)
    assert [tuple(x.shape) for x, y in dataset] == [(4, 2, 2), (4, 2, 2), (2, 2, 2)]
    assert all(y is None for _, y in dataset)
    with pytest.raises(FeedError, match="shuffle=True needs a PartitionSpill"):
        ArrowPartitionDataset(table, X, batch_size=4, shuffle=True)
    calls = ArrowPartitionDataset(lambda: make_batches(10), X, ID, batch_size=3)
    assert [len(y) for _, y in calls] == [3, 3, 3, 1]
    with pytest.raises(TypeError):
        len(calls)
