"""The files under a spill: where they go, how they are written, and how they are mapped.

Worker side: this module never imports pyspark. `deepspark.data.spill.PartitionSpill` is the
public face; this module holds its file machinery.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from deepspark.data.spec import FeedError

__all__ = ["DEFAULT_BLOCK_BYTES", "DEFAULT_SHUFFLE_WINDOW_BYTES", "spill_directory"]

DEFAULT_BLOCK_BYTES = 1 << 20
DEFAULT_SHUFFLE_WINDOW_BYTES = 64 << 20
_CAN_ADVISE = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


def spill_directory(directory: str | os.PathLike[str] | None = None) -> str:
    """Where spill files go: ``directory`` if given, else Spark's local dirs, else the temp dir.

    Inside a Spark task ``SPARK_LOCAL_DIRS`` names the executor's block-manager directories
    (Spark removes them when the executor stops, a last resort after a killed task); with
    several, tasks spread over them.
    """
    if directory is not None:
        return os.fspath(directory)
    local_dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d.strip()]
    if local_dirs:
        return local_dirs[os.getpid() % len(local_dirs)].strip()
    return tempfile.gettempdir()


@dataclass
class _SplitInfo:
    """What was written for one split value."""

    path: str
    block_rows: list[int] = field(default_factory=list)
    null_counts: dict[str, int] = field(default_factory=dict)
    column_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.block_rows)


class _SplitWriter:
    def __init__(self, info: _SplitInfo, block_bytes: int) -> None:
        self.info = info
        self._block_bytes = block_bytes
        self._block_rows = 0
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, part: pa.RecordBatch) -> None:
        rows = part.num_rows
        if rows == 0:
            return
        if self._schema is not None and not part.schema.equals(self._schema):
            raise FeedError(
                f"the input batches change schema mid-partition: {self._schema} then "
                f"{part.schema}; every batch of a partition must have the same columns and types"
            )
        if self._writer is None:
            self._sink = pa.output_stream(self.info.path, buffer_size=1 << 20)
            options = pa.ipc.IpcWriteOptions(use_threads=False)
            self._writer = pa.ipc.new_file(self._sink, part.schema, options=options)
            self._schema = part.schema
            row_bytes = max(1, part.nbytes // rows)
            self._block_rows = max(1, self._block_bytes // row_bytes)
        for name, column in zip(part.schema.names, part.columns, strict=True):
            self.info.null_counts[name] = self.info.null_counts.get(name, 0) + column.null_count
            self.info.column_bytes[name] = self.info.column_bytes.get(name, 0) + column.nbytes
        pieces = -(-rows // self._block_rows)
        piece_rows = -(-rows // pieces)  # even pieces: no tiny tail block
        for start in range(0, rows, piece_rows):
            piece = part.slice(start, piece_rows)
            self._writer.write_batch(piece)
            self.info.block_rows.append(piece.num_rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None


class _MappedFile:
    """One spill file mapped read-only, its blocks readable without copies."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._buffer = pa.py_buffer(self._map)
        self._base = self._buffer.address
        self._reader = pa.ipc.open_file(self._buffer)

    def block(self, index: int, columns: Sequence[str]) -> pa.RecordBatch:
        return self._reader.get_batch(index).select(list(columns))

    def release(self, batch: pa.RecordBatch) -> None:
        """Let the kernel drop this block's mapped pages (they stay in the page cache).

        The mapping is shared and read-only, so a page that is touched again is simply read
        back; nothing is lost. This keeps the task's resident memory to about one window.
        """
        if not _CAN_ADVISE:
            return
        low, high = None, None
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is None or buffer.size == 0:
                    continue
                low = buffer.address if low is None else min(low, buffer.address)
                end = buffer.address + buffer.size
                high = end if high is None else max(high, end)
        if low is None or high is None:
            return
        start = (low - self._base) // mmap.PAGESIZE * mmap.PAGESIZE
        length = min(high - self._base, len(self._map)) - start
        if start >= 0 and length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        self._reader = None
        self._buffer = None
        # Arrays a caller still holds may export the mapping; it is then unmapped when they go.
        with contextlib.suppress(BufferError):
            self._map.close()


def _remove_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not from a forked child (e.g. a DataLoader worker)
        shutil.rmtree(path, ignore_errors=True)


def _write_splits(
    batches: Iterable[pa.RecordBatch],
    root: str,
    split_column: str | None,
    block_bytes: int,
    on_part: Callable[[int, pa.RecordBatch], None] | None = None,
) -> tuple[dict[int, _SplitInfo], pa.Schema | None]:
    """Write a task's input into one IPC file per split under ``root``, in one pass.

    ``on_part(split, part)`` sees every written part as it goes (the streamed first epoch
    queues the training rows). Returns the splits that hold rows and the columns' schema; on
    an error the writers are closed and ``root`` is removed before it propagates.
    """
    writers: dict[int, _SplitWriter] = {}
    schema: pa.Schema | None = None
    try:
        for batch in _record_batches(batches):
            for split, part in _split_rows(batch, split_column):
                if schema is None:
                    schema = part.schema
                writer = writers.get(split)
                if writer is None:
                    path = os.path.join(root, f"split-{split}.arrow")
                    writer = writers[split] = _SplitWriter(_SplitInfo(path), block_bytes)
                writer.write(part)
                if on_part is not None:
                    on_part(split, part)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return {split: w.info for split, w in writers.items() if w.info.block_rows}, schema


def _record_batches(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        if isinstance(batch, pa.Table):
            yield from batch.to_batches()
        elif isinstance(batch, pa.RecordBatch):
            yield batch
        else:
            raise FeedError(f"expected pyarrow RecordBatch objects, got {type(batch).__name__}")


def _split_rows(
    batch: pa.RecordBatch, split_column: str | None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    if split_column is None:
        yield 0, batch
        return
    index = batch.schema.get_field_index(split_column)
    if index < 0:
        available = ", ".join(batch.schema.names)
        raise FeedError(
            f"split_column={split_column!r} is not in the data; available columns: {available}"
        )
    column = batch.column(index)
    if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise FeedError(
            f"split_column={split_column!r} has type {column.type}; it must hold integers "
            "(0 = train, 1 = validation)"
        )
    if column.null_count:
        raise FeedError(
            f"split_column={split_column!r} has {column.null_count} null values; every row "
            "needs a split number"
        )
    values = column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    rest = batch.remove_column(index)
    splits = np.unique(values)
    if splits.size and splits[0] < 0:
        raise FeedError(
            f"split_column={split_column!r} holds {int(splits[0])}; split numbers are >= 0"
        )
    if splits.size == 1:
        yield int(splits[0]), rest
        return
    for split in splits:
        yield int(split), rest.filter(pa.array(values == split))
