"""Chunk rows: a DataFrame's rows kept as Arrow IPC streams, one binary value per slice of rows.

Worker side: this module never imports pyspark. `deepspark.data.cache` (the driver side) turns
a DataFrame into chunk rows once and keeps them on the executors' disks; a training task gets
chunk rows instead of the original rows and `rows_from_chunks` turns them back into the record
batches the feed reads, without copying the values.

A chunk row of the cache holds one slice of a partition (at most `CHUNK_ROWS` rows and about
`CHUNK_BYTES` bytes, every column) and where it came from: the partition, its place in the
partition and its first row's index there, and its row count. A chunk row of a job's input
holds a chunk, the rank it goes to, the slice of the chunk that rank reads, and any further
columns (the split tag), which are appended to every row decoded from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from deepspark.errors import DeepsparkError

__all__ = [
    "CACHE_SCHEMA",
    "CHUNK_BYTES",
    "CHUNK_COLUMN",
    "CHUNK_ROWS",
    "FIRST_ROW_COLUMN",
    "HEAD_COLUMN",
    "HEAD_PARTITIONS",
    "HEAD_ROWS",
    "PARTITION_COLUMN",
    "RANK_COLUMN",
    "ROWS_COLUMN",
    "SEQUENCE_COLUMN",
    "SLICE_ROWS_COLUMN",
    "SLICE_START_COLUMN",
    "CacheLimitExceeded",
    "encode_for_ranks",
    "encode_partition",
    "read_chunk",
    "rows_from_chunks",
]

CHUNK_COLUMN = "__deepspark_chunk"
PARTITION_COLUMN = "__deepspark_partition"
SEQUENCE_COLUMN = "__deepspark_sequence"
FIRST_ROW_COLUMN = "__deepspark_first_row"
ROWS_COLUMN = "__deepspark_rows"
HEAD_COLUMN = "__deepspark_head"
RANK_COLUMN = "__deepspark_rank"
SLICE_START_COLUMN = "__deepspark_slice_start"
SLICE_ROWS_COLUMN = "__deepspark_slice_rows"

# Columns that describe a chunk; any other column of a chunk row is appended to its rows.
_CHUNK_FIELDS = frozenset(
    {
        CHUNK_COLUMN,
        PARTITION_COLUMN,
        SEQUENCE_COLUMN,
        FIRST_ROW_COLUMN,
        ROWS_COLUMN,
        HEAD_COLUMN,
        RANK_COLUMN,
        SLICE_START_COLUMN,
        SLICE_ROWS_COLUMN,
    }
)

# The cached DataFrame's schema (Spark DDL).
CACHE_SCHEMA = (
    f"{PARTITION_COLUMN} int, {SEQUENCE_COLUMN} int, {FIRST_ROW_COLUMN} long, "
    f"{ROWS_COLUMN} int, {CHUNK_COLUMN} binary, {HEAD_COLUMN} binary"
)

CHUNK_ROWS = 4096
CHUNK_BYTES = 2 << 20
# The first rows of the first partitions travel to the driver with the cache's statistics, so
# the driver's column checks need no Spark job for a cached DataFrame.
HEAD_ROWS = 8
HEAD_PARTITIONS = 4

_CACHE_ARROW_SCHEMA = pa.schema(
    [
        (PARTITION_COLUMN, pa.int32()),
        (SEQUENCE_COLUMN, pa.int32()),
        (FIRST_ROW_COLUMN, pa.int64()),
        (ROWS_COLUMN, pa.int32()),
        (CHUNK_COLUMN, pa.binary()),
        (HEAD_COLUMN, pa.binary()),
    ]
)


class CacheLimitExceeded(DeepsparkError, RuntimeError):
    """One partition's chunks alone passed the cache's byte limit (raised inside the task)."""

    MARK = "deepspark-cache-limit:"

    def __init__(self, partition: int, size: int, limit: int) -> None:
        super().__init__(f"{self.MARK} partition {partition} alone passed {size} bytes")
        self.partition, self.size, self.limit = partition, size, limit


class _Slicer:
    """Collects record batches and cuts them into chunks of bounded rows and bytes."""

    def __init__(self, chunk_rows: int, chunk_bytes: int) -> None:
        self.chunk_rows = max(1, chunk_rows)
        self.chunk_bytes = max(1, chunk_bytes)
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0
        self.bytes = 0

    def add(self, batch: pa.RecordBatch) -> Iterator[list[pa.RecordBatch]]:
        """Take `batch`; yield every chunk (a list of batches) that became full."""
        if batch.num_rows == 0:
            return
        row_bytes = max(1, batch.nbytes // batch.num_rows)
        start = 0
        while start < batch.num_rows:
            room = min(self.chunk_rows - self.rows, (self.chunk_bytes - self.bytes) // row_bytes)
            take = min(max(room, 1 if self.rows == 0 else 0), batch.num_rows - start)
            if take > 0:
                self.pending.append(batch.slice(start, take))
                self.rows += take
                self.bytes += take * row_bytes
                start += take
            if (
                take == 0
                or self.rows >= self.chunk_rows
                or self.bytes + row_bytes > self.chunk_bytes
            ):
                yield self.take()

    def take(self) -> list[pa.RecordBatch]:
        pending, self.pending, self.rows, self.bytes = self.pending, [], 0, 0
        return pending


def _ipc_bytes(batches: Sequence[pa.RecordBatch], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def encode_partition(
    batches: Iterable[pa.RecordBatch],
    partition: int,
    *,
    chunk_rows: int = CHUNK_ROWS,
    chunk_bytes: int = CHUNK_BYTES,
    max_bytes: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """One partition's rows as cache rows (`CACHE_SCHEMA`), one record batch per chunk.

    An empty partition gives one row with no chunk bytes and 0 rows, so the cache knows every
    partition. The first chunk of partitions below `HEAD_PARTITIONS` also carries the first
    `HEAD_ROWS` rows in its head column.

    Raises
    ------
    CacheLimitExceeded
        When this partition's chunks alone pass `max_bytes`.
    """
    slicer = _Slicer(chunk_rows, chunk_bytes)
    schema: pa.Schema | None = None
    state = {"sequence": 0, "first_row": 0, "bytes": 0}

    def chunk_row(pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
        assert schema is not None
        rows = sum(piece.num_rows for piece in pieces)
        blob = _ipc_bytes(pieces, schema)
        state["bytes"] += len(blob)
        if max_bytes is not None and state["bytes"] > max_bytes:
            raise CacheLimitExceeded(partition, state["bytes"], max_bytes)
        head = None
        if state["sequence"] == 0 and partition < HEAD_PARTITIONS:
            head_rows = pa.Table.from_batches(pieces, schema).slice(0, HEAD_ROWS)
            head = _ipc_bytes(head_rows.to_batches(), schema)
        row = pa.RecordBatch.from_arrays(
            [
                pa.array([partition], pa.int32()),
                pa.array([state["sequence"]], pa.int32()),
                pa.array([state["first_row"]], pa.int64()),
                pa.array([rows], pa.int32()),
                pa.array([blob], pa.binary()),
                pa.array([head], pa.binary()),
            ],
            schema=_CACHE_ARROW_SCHEMA,
        )
        state["sequence"] += 1
        state["first_row"] += rows
        return row

    for batch in batches:
        schema = batch.schema if schema is None else schema
        for pieces in slicer.add(batch):
            yield chunk_row(pieces)
    if slicer.rows:
        yield chunk_row(slicer.take())
    if state["sequence"] == 0:
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([partition], pa.int32()),
                pa.array([0], pa.int32()),
                pa.array([0], pa.int64()),
                pa.array([0], pa.int32()),
                pa.array([b""], pa.binary()),
                pa.array([None], pa.binary()),
            ],
            schema=_CACHE_ARROW_SCHEMA,
        )


def encode_for_ranks(
    batches: Iterable[pa.RecordBatch],
    partition: int,
    num_ranks: int,
    tags: dict[str, int],
    *,
    chunk_rows: int = CHUNK_ROWS,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pa.RecordBatch]:
    """A partition's rows as a job's chunk rows, dealt round-robin over `num_ranks` ranks.

    Row ``j`` of partition ``p`` goes to rank ``(p + j) % num_ranks``, so every rank gets the
    same number of rows from each partition, give or take one. Each output row holds the rank,
    the chunk, its slice (all of it) and the `tags` (int32 columns, e.g. the split).
    """
    slicers = [_Slicer(chunk_rows, chunk_bytes) for _ in range(num_ranks)]
    schema: pa.Schema | None = None
    next_row = 0

    def job_row(rank: int, pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
        assert schema is not None
        rows = sum(piece.num_rows for piece in pieces)
        columns = {
            RANK_COLUMN: pa.array([rank], pa.int32()),
            CHUNK_COLUMN: pa.array([_ipc_bytes(pieces, schema)], pa.binary()),
            SLICE_START_COLUMN: pa.array([0], pa.int32()),
            SLICE_ROWS_COLUMN: pa.array([rows], pa.int32()),
        }
        columns.update({name: pa.array([value], pa.int32()) for name, value in tags.items()})
        return pa.RecordBatch.from_pydict(columns)

    for batch in batches:
        schema = batch.schema if schema is None else schema
        if batch.num_rows == 0:
            continue
        ranks = (partition + next_row + np.arange(batch.num_rows)) % num_ranks
        next_row += batch.num_rows
        for rank, slicer in enumerate(slicers):
            rows = np.flatnonzero(ranks == rank)
            if rows.size:
                for pieces in slicer.add(batch.take(pa.array(rows))):
                    yield job_row(rank, pieces)
    for rank, slicer in enumerate(slicers):
        if slicer.rows:
            yield job_row(rank, slicer.take())


def read_chunk(blob: pa.Buffer | bytes) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """The schema and record batches of one chunk; the batches are views of `blob`."""
    buffer = blob if isinstance(blob, pa.Buffer) else pa.py_buffer(blob)
    with pa.ipc.open_stream(buffer) as reader:
        return reader.schema, list(reader)


def rows_from_chunks(
    batches: Iterable[pa.RecordBatch], columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A task's input with chunk rows decoded into the original rows.

    Batches with a `CHUNK_COLUMN` are chunk rows: each chunk is read without copying its values
    (its record batches are views of the incoming Arrow buffer), cut to the row's slice when
    the batch has `SLICE_START_COLUMN` and `SLICE_ROWS_COLUMN`, projected to `columns` (all
    when ``None``), and every other non-chunk column of the row (such as the split tag) is
    appended as a constant column. Any other batch passes through unchanged.

    Examples
    --------
    >>> import pyarrow as pa
    >>> rows = pa.RecordBatch.from_pydict({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    >>> (cache_row,) = encode_partition([rows], partition=0)
    >>> job_row = pa.RecordBatch.from_pydict(
    ...     {CHUNK_COLUMN: cache_row.column(CHUNK_COLUMN), SLICE_START_COLUMN: [1],
    ...      SLICE_ROWS_COLUMN: [2], "split": pa.array([1], pa.int32())})
    >>> [batch.to_pydict() for batch in rows_from_chunks([job_row], ["x"])]
    [{'x': [2.0, 3.0], 'split': [1, 1]}]
    """
    for batch in batches:
        names = batch.schema.names
        if CHUNK_COLUMN not in names:
            yield batch
            continue
        blobs = _binary_values(batch.column(CHUNK_COLUMN))
        starts = _int_column(batch, SLICE_START_COLUMN)
        lengths = _int_column(batch, SLICE_ROWS_COLUMN)
        carried = [name for name in names if name not in _CHUNK_FIELDS]
        for row, blob in enumerate(blobs):
            if blob is None or blob.size == 0:
                continue
            _, decoded = read_chunk(blob)
            start = int(starts[row]) if starts is not None else 0
            length = int(lengths[row]) if lengths is not None else None
            for piece in _slice_batches(decoded, start, length):
                if columns is not None:
                    piece = piece.select(list(columns))
                for name in carried:
                    value = batch.column(name)[row]
                    piece = piece.append_column(
                        batch.schema.field(name), pa.repeat(value, piece.num_rows)
                    )
                yield piece


def _binary_values(column: pa.Array) -> list[pa.Buffer | None]:
    """Each value of a binary column as a view of the column's data buffer (no copy)."""
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise TypeError(f"{CHUNK_COLUMN} must be binary, found {column.type}")
    _, offsets_buffer, data = column.buffers()[:3]
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[
        column.offset : column.offset + len(column) + 1
    ]
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [
        data.slice(int(start), int(end - start)) if ok and data is not None else None
        for start, end, ok in zip(offsets[:-1], offsets[1:], valid, strict=True)
    ]


def _int_column(batch: pa.RecordBatch, name: str) -> np.ndarray | None:
    if name not in batch.schema.names:
        return None
    return batch.column(name).to_numpy(zero_copy_only=False)


def _slice_batches(
    batches: list[pa.RecordBatch], start: int, length: int | None
) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, start + length)`` of consecutive `batches`, as zero-copy slices."""
    remaining = None if length is None else length
    for batch in batches:
        if remaining is not None and remaining <= 0:
            return
        if start >= batch.num_rows:
            start -= batch.num_rows
            continue
        take = (
            batch.num_rows - start if remaining is None else min(remaining, batch.num_rows - start)
        )
        if take > 0:
            yield batch.slice(start, take)
        if remaining is not None:
            remaining -= take
        start = 0
