"""A task's partition spilled on a background thread while its first epoch trains from it.

Worker side: this module never imports pyspark.

`StreamingSpill` reads the task's input on its own thread. Every batch goes to the spill files
(exactly as `PartitionSpill.write` writes them) and the rows of one split (train) also go to a
bounded queue, from which the first epoch takes its batches while the rest of the partition is
still arriving. When the input ends, `finish` returns the finished `PartitionSpill` for every
later epoch. `WindowFeed` turns the rows taken from the queue into batches: the rows of one
*window* (what the ranks agreed to train on next) are prepared together and visited in a seeded
permutation, so the first epoch mixes rows within each window.
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa

from deepspark.data.batching import Batch, _PendingBatch, _Window
from deepspark.data.readers import check_column, prepare_column
from deepspark.data.spec import FeedError, TensorSpec, normalize_specs
from deepspark.data.spill import PartitionSpill
from deepspark.data.spill_files import DEFAULT_BLOCK_BYTES, _write_splits, spill_directory

__all__ = ["DEFAULT_QUEUE_BYTES", "StreamingSpill", "WindowFeed"]

# Arrow data waiting for the first epoch, at most (a queue always admits one full batch of rows).
DEFAULT_QUEUE_BYTES = 256 << 20


class StreamingSpill:
    """Spill ``batches`` on a background thread; hand out one split's rows as they arrive.

    Parameters
    ----------
    batches : iterable of pyarrow.RecordBatch
        The task's input; from now on only the background thread reads it.
    directory : str, optional
        Parent of the spill's own directory (see `spill_directory`).
    split_column : str, optional
        As in `PartitionSpill.write`.
    feed_split : int or None, default 0
        The split whose rows are queued for `take`; ``None`` queues nothing (spill only).
    max_queued_bytes : int
        The queue's bound; the reader waits while it is full (and the consumer has what it
        asked for), so memory stays bounded however large the partition is.
    block_bytes : int

    Examples
    --------
    >>> import pyarrow as pa
    >>> data = [pa.record_batch({"x": [1.0, 2.0, 3.0]}), pa.record_batch({"x": [4.0, 5.0]})]
    >>> stream = StreamingSpill(data)
    >>> stream.wait_rows(6, timeout_s=10)  # more than there are: waits for the input's end
    (5, True)
    >>> [part.num_rows for part in stream.take(4)]
    [3, 1]
    >>> with stream.finish(timeout_s=10) as spill:
    ...     spill.num_rows()
    5
    """

    def __init__(
        self,
        batches: Iterable[pa.RecordBatch],
        directory: str | os.PathLike[str] | None = None,
        *,
        split_column: str | None = None,
        feed_split: int | None = 0,
        max_queued_bytes: int = DEFAULT_QUEUE_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        if block_bytes < 1 or max_queued_bytes < 1:
            raise FeedError("block_bytes and max_queued_bytes must be positive")
        parent = spill_directory(directory)
        os.makedirs(parent, exist_ok=True)
        self._root = tempfile.mkdtemp(prefix="deepspark-spill-", dir=parent)
        self._batches = batches
        self._split_column = split_column
        self._feed_split = feed_split
        self._max_bytes = max_queued_bytes
        self._block_bytes = block_bytes
        self._queue: collections.deque[pa.RecordBatch] = collections.deque()
        self._queued_rows = 0
        self._queued_bytes = 0
        self._wanted = 1
        self._feeding = feed_split is not None
        self._abandoned = False
        self._done = False
        self._error: BaseException | None = None
        self._spill: PartitionSpill | None = None
        self._changed = threading.Condition()
        # wall-clock moments: the first input batch, and the end of the input
        self.marks: dict[str, float] = {}
        self._thread = threading.Thread(
            target=self._read, name="deepspark-spill-reader", daemon=True
        )
        self._thread.start()

    # -- the reader thread --------------------------------------------------------------------

    def _read(self) -> None:
        def arrived(split: int, part: pa.RecordBatch) -> None:
            self.marks.setdefault("first_batch", time.time())
            if self._feeding and split == self._feed_split and part.num_rows:
                self._enqueue(part)

        try:
            splits, schema = _write_splits(
                self._batches, self._root, self._split_column, self._block_bytes, arrived
            )
            spill = PartitionSpill(self._root, splits, schema)
        except BaseException as error:  # handed to the consumer by wait_rows and finish
            with self._changed:
                self._error = error
                self._done = True
                self._changed.notify_all()
            return
        self.marks.setdefault("first_batch", time.time())
        self.marks["input_done"] = time.time()
        with self._changed:
            self._done = True
            if self._abandoned:
                spill.close()
            else:
                self._spill = spill
            self._changed.notify_all()

    def _enqueue(self, part: pa.RecordBatch) -> None:
        with self._changed:
            while (
                self._feeding
                and self._queued_bytes >= self._max_bytes
                and self._queued_rows >= self._wanted
            ):
                self._changed.wait(1.0)
            if not self._feeding:
                return
            self._queue.append(part)
            self._queued_rows += part.num_rows
            self._queued_bytes += part.nbytes
            self._changed.notify_all()

    # -- the consumer -------------------------------------------------------------------------

    def wait_rows(self, rows: int, timeout_s: float) -> tuple[int, bool]:
        """Wait until ``rows`` rows are queued or the input has ended.

        Returns
        -------
        (int, bool)
            The rows queued now, and whether the input has ended (no more will come).

        Raises
        ------
        TimeoutError
            No row arrived for ``timeout_s`` while neither happened (the wait goes on as long
            as rows keep arriving: a large window of a slow input is not an error).
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._wanted = max(1, rows)
            self._changed.notify_all()
            seen = self._queued_rows
            while self._queued_rows < rows and not self._done:
                if self._queued_rows > seen:
                    seen, deadline = self._queued_rows, time.monotonic() + timeout_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"the task's input delivered no row in {timeout_s:g} s, with "
                        f"{self._queued_rows} of the {rows} the rank waits for queued, and did "
                        "not end"
                    )
                self._changed.wait(min(remaining, 1.0))
            self._raise_error()
            return self._queued_rows, self._done

    def take(self, rows: int) -> list[pa.RecordBatch]:
        """Remove the first ``rows`` queued rows (all there are, if fewer) and return them."""
        parts: list[pa.RecordBatch] = []
        with self._changed:
            needed = rows
            while needed > 0 and self._queue:
                head = self._queue[0]
                if head.num_rows <= needed:
                    self._queue.popleft()
                    parts.append(head)
                    self._queued_bytes -= head.nbytes
                else:
                    parts.append(head.slice(0, needed))
                    rest = head.slice(needed)
                    self._queue[0] = rest
                    self._queued_bytes -= head.nbytes - rest.nbytes
                taken = parts[-1].num_rows
                self._queued_rows -= taken
                needed -= taken
            self._changed.notify_all()
        return parts

    def stop_feeding(self) -> None:
        """Queue no more rows (and drop the queued ones): the spill alone is read from now."""
        with self._changed:
            self._feeding = False
            self._queue.clear()
            self._queued_rows = self._queued_bytes = 0
            self._changed.notify_all()

    def finish(self, timeout_s: float) -> PartitionSpill:
        """The whole partition's spill, once the input has ended (within ``timeout_s``)."""
        self.stop_feeding()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the task's input did not end within {timeout_s:g} s")
        with self._changed:
            self._raise_error()
            assert self._spill is not None
            return self._spill

    def close(self) -> None:
        """Stop feeding and remove the spill, now or as soon as the reader ends."""
        with self._changed:
            self._abandoned = True
            spill, self._spill = self._spill, None
        self.stop_feeding()
        if spill is not None:
            spill.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class WindowFeed:
    """Batches of one rank from the rows of successive windows (the streamed first epoch).

    Each window's rows are checked, prepared together and visited in an order seeded by
    ``(seed, epoch, rank, window)``. Filler rows (for ``num_real`` below the batch size)
    repeat the window's rows, or the first window's when a window has none, or are zeros
    when the rank has seen no row at all, as filler is in `PartitionSpill.epoch`.

    Parameters
    ----------
    features, labels : TensorSpec or sequence of TensorSpec
    seed, epoch, rank : int

    Examples
    --------
    >>> import pyarrow as pa
    >>> feed = WindowFeed(TensorSpec("x", "scalar"), seed=0, epoch=0, rank=0)
    >>> batches = list(feed.window([pa.record_batch({"x": [1.0, 2.0, 3.0]})], [2, 1], 2))
    >>> [(len(b), b.num_real) for b in batches]
    [(2, 2), (2, 1)]
    >>> sorted(v for b in batches for v in b.features[0][: b.num_real].tolist())
    [1.0, 2.0, 3.0]
    """

    def __init__(
        self,
        features: TensorSpec | Sequence[TensorSpec],
        labels: TensorSpec | Sequence[TensorSpec] = (),
        *,
        seed: int,
        epoch: int,
        rank: int,
    ) -> None:
        self._features = normalize_specs(features)
        self._labels = normalize_specs(labels)
        self._specs: tuple[TensorSpec, ...] = self._features + self._labels
        if not self._specs:
            raise FeedError("at least one feature or label spec is needed")
        self._shaped = False
        self._seed = (seed, epoch, rank)
        self._windows = 0
        self._filler: _Window | None = None  # the first rows this rank saw

    def window(
        self, parts: Sequence[pa.RecordBatch], real_rows: Sequence[int], batch_size: int
    ) -> Iterator[Batch]:
        """One batch of ``batch_size`` rows per entry of ``real_rows`` from ``parts``' rows.

        ``sum(real_rows)`` must equal the rows of ``parts``.
        """
        rows = sum(part.num_rows for part in parts)
        if rows != sum(real_rows):
            raise FeedError(f"a window of {rows} rows cannot fill {sum(real_rows)} real rows")
        window = self._prepare(parts, rows) if rows else None
        if window is not None and self._filler is None:
            keep = min(rows, batch_size)
            first = window.index(0, keep)
            self._filler = _Window([_rows_of(values, first) for values in window.prepared], keep)
        source = window if window is not None else self._filler
        features, labels = self._resolved()
        start = 0
        for real in real_rows:
            pieces = []
            if real:
                assert window is not None
                pieces.append((window, window.index(start, start + real)))
                start += real
            if real < batch_size and source is not None:
                pieces.extend(_cycle(source, batch_size - real))
            yield _PendingBatch(pieces, batch_size, real).build(features, labels)

    def _prepare(self, parts: Sequence[pa.RecordBatch], rows: int) -> _Window:
        table = pa.Table.from_batches(list(parts)).combine_chunks()
        batch = table.to_batches()[0] if table.num_rows else None
        assert batch is not None
        if not self._shaped:
            self._specs = tuple(
                replace(spec, shape=check_column(batch, spec)) if not spec.shape else spec
                for spec in self._specs
            )
            self._shaped = True
        for spec in self._specs:
            check_column(batch, spec)
        prepared = [prepare_column(batch, spec) for spec in self._specs]
        rng = np.random.default_rng((*self._seed, self._windows))
        self._windows += 1
        return _Window(prepared, rows, rng.permutation(rows))

    def _resolved(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        count = len(self._features)
        return self._specs[:count], self._specs[count:]


def _rows_of(values, index: np.ndarray):
    if isinstance(values, np.ndarray):
        return values[index]
    return values.take(pa.array(index))


def _cycle(window: _Window, count: int) -> list[tuple[_Window, np.ndarray]]:
    """``count`` rows of ``window``, starting over as often as needed."""
    positions = np.arange(count) % window.rows
    if window.order is not None:
        return [(window, window.order[positions])]
    return [(window, positions)]
