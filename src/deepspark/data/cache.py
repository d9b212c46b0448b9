"""Driver side of `deepspark.cache`: a DataFrame converted to Arrow once, reused by later fits.

`cache(df)` turns `df` into chunk rows (`deepspark.data.chunks`: Arrow IPC streams of a few
thousand rows each) with one Spark job, persisted with ``StorageLevel.DISK_ONLY``: Spark's
block manager keeps them on the executors' local disks, recomputes lost blocks from `df`'s
lineage after an executor is lost, and frees them on `unpersist` or when the application stops.
A later fit or evaluate on a DataFrame with the same analysed plan (`DataFrame.sameSemantics`)
reads the chunks instead of evaluating the plan and converting its rows from the JVM again.

pyspark is imported inside the functions that need it (the Spark-free names of the package stay
importable without it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from deepspark.context.identity import session_identity
from deepspark.context.session import on_stop_context
from deepspark.context.spark_versions import collect_arrow, repartition_by_rank
from deepspark.data.chunks import (
    CACHE_SCHEMA,
    CHUNK_BYTES,
    CHUNK_COLUMN,
    CHUNK_ROWS,
    FIRST_ROW_COLUMN,
    HEAD_COLUMN,
    HEAD_ROWS,
    PARTITION_COLUMN,
    RANK_COLUMN,
    ROWS_COLUMN,
    SEQUENCE_COLUMN,
    SLICE_ROWS_COLUMN,
    SLICE_START_COLUMN,
    CacheLimitExceeded,
    encode_for_ranks,
    encode_partition,
    read_chunk,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["CachedFrame", "cache", "cached_frame_of", "chunk_input", "uncache"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_caches: list[CachedFrame] = []


@dataclass(eq=False)
class CachedFrame:
    """A DataFrame kept as Arrow chunks on the executors' disks; returned by `cache`.

    Attributes
    ----------
    rows : int
        Rows of the DataFrame.
    bytes : int
        Size of the converted chunks (uncompressed Arrow IPC), about what the executors' disks
        hold.
    chunks : int
        Chunks holding rows (each at most 4096 rows and about 2 MiB).
    partitions : int
        Partitions of the DataFrame.
    """

    source: DataFrame = field(repr=False)
    chunk_frame: DataFrame = field(repr=False)
    rows: int
    bytes: int
    chunks: int
    partitions: int
    # per chunk, sorted by (partition, sequence): partition, first row in it, rows, bytes
    chunk_table: pa.Table = field(repr=False)
    sample: pa.Table = field(repr=False)  # the first rows, for the driver's column checks
    semantic_hash: int = field(repr=False, default=0)
    session_key: str = field(repr=False, default="")
    active: bool = True
    # (ranks, tag column, tag) -> the planned chunk rows of `_ranked_chunks`: planning them
    # costs hundreds of JVM calls, and a search fits the same cached frame many times
    ranked: dict[tuple[int, str, int], DataFrame] = field(repr=False, default_factory=dict)

    def unpersist(self) -> None:
        """Free the chunks on the executors now; later fits read the DataFrame again."""
        with _lock:
            if self in _caches:
                _caches.remove(self)
        if not self.active:
            return
        self.active = False
        try:
            self.chunk_frame.unpersist(blocking=True)
        except Exception as error:  # a stopped session has freed its blocks already
            _log.debug("cache: unpersist on a stopped session: %s", error)

    def first_rows(self, columns: Sequence[str], rows: int) -> pa.Table | None:
        """Up to `rows` first rows of `columns` from the kept sample (``None`` if it has none)."""
        if self.sample.num_rows == 0 and self.rows > 0:
            return None
        if not set(columns) <= set(self.sample.column_names):
            return None
        return self.sample.select(list(columns)).slice(0, rows)

    @property
    def storage_level(self) -> Any:
        """Spark's storage level of the chunks (``DISK_ONLY`` while cached)."""
        return self.chunk_frame.storageLevel


def cache(df: DataFrame, *, max_bytes: int | None = None) -> CachedFrame:
    """Convert `df` to Arrow once and keep it on the executors' disks for later fits.

    Later `Estimator.fit` and `evaluate` calls on a DataFrame with the same analysed plan (the
    same object, or one built the same way) read the kept chunks instead of evaluating the
    plan and converting its rows again. A DataFrame with another plan (another filter, other
    columns) does not match and is read as usual. Like Spark's own cache, files that changed
    under the same plan are not noticed: call `uncache` (or `.unpersist()`) and cache again.

    Parameters
    ----------
    df : pyspark.sql.DataFrame
        Classic or Spark Connect; every column is kept.
    max_bytes : int, optional
        The most bytes the converted chunks may take. Over it the cache is dropped and an
        error says the size; a partition alone over it stops the job early.

    Returns
    -------
    CachedFrame
        Reports ``rows``, ``bytes``, ``chunks`` and ``partitions``; ``unpersist()`` frees it.
        Caching a DataFrame that is already cached returns the existing handle.

    Raises
    ------
    ValueError
        `max_bytes` is not a positive int, or the converted data is larger.

    Examples
    --------
    >>> import deepspark as ds
    >>> spark = ds.init_context(cores=2)  # doctest: +SKIP
    >>> df = spark.range(10_000).selectExpr("id", "id % 10 AS label")  # doctest: +SKIP
    >>> cached = ds.cache(df)  # doctest: +SKIP
    >>> cached.rows, cached.chunks  # doctest: +SKIP
    (10000, 3)
    >>> cached.unpersist()  # doctest: +SKIP
    """
    on_stop_context(_drop_session_caches)  # once: what a session caches goes with it
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
    ):
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    existing = cached_frame_of(df)
    if existing is not None:
        if max_bytes is not None and existing.bytes > max_bytes:
            existing.unpersist()
            raise ValueError(_over_limit(existing.bytes, max_bytes))
        return existing

    chunk_frame, stats = _cache_chunks(df, max_bytes)
    stats = stats.sort_by([(PARTITION_COLUMN, "ascending"), (SEQUENCE_COLUMN, "ascending")])
    total_bytes = int(pa.compute.sum(stats.column("bytes")).as_py() or 0)
    if max_bytes is not None and total_bytes > max_bytes:
        chunk_frame.unpersist(blocking=True)
        raise ValueError(_over_limit(total_bytes, max_bytes))
    rows = stats.column(ROWS_COLUMN).to_numpy()
    cached = CachedFrame(
        source=df,
        chunk_frame=chunk_frame,
        rows=int(rows.sum()),
        bytes=total_bytes,
        chunks=int((rows > 0).sum()),
        partitions=len(set(stats.column(PARTITION_COLUMN).to_pylist())),
        chunk_table=stats.select([PARTITION_COLUMN, FIRST_ROW_COLUMN, ROWS_COLUMN, "bytes"]),
        sample=_sample(stats.column(HEAD_COLUMN).to_pylist(), df),
        semantic_hash=df.semanticHash(),
        session_key=session_identity(df.sparkSession),
    )
    with _lock:
        _caches.append(cached)
    _log.info(
        "cache: %d rows in %d chunks (%d bytes) from %d partitions, on the executors' disks",
        cached.rows,
        cached.chunks,
        cached.bytes,
        cached.partitions,
    )
    return cached


def _cache_chunks(df: DataFrame, max_bytes: int | None) -> tuple[DataFrame, pa.Table]:
    """Run the caching job: the chunks, persisted on the executors' disks, and the table of
    what each holds (refused with the limit's message when `max_bytes` is passed)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    chunk_rows, chunk_bytes = CHUNK_ROWS, CHUNK_BYTES

    def encode(batches):
        # runs in each task of the caching job; plain values only
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        yield from encode_partition(
            batches,
            partition,
            chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes,
            max_bytes=max_bytes,
        )

    chunk_frame = df.mapInArrow(encode, CACHE_SCHEMA)
    chunk_frame.persist(StorageLevel.DISK_ONLY)
    try:
        # one job: materialises the chunks and reports what each holds
        stats = collect_arrow(
            chunk_frame.select(
                PARTITION_COLUMN,
                SEQUENCE_COLUMN,
                FIRST_ROW_COLUMN,
                ROWS_COLUMN,
                F.length(CHUNK_COLUMN).alias("bytes"),
                HEAD_COLUMN,
            )
        )
    except Exception as error:
        chunk_frame.unpersist(blocking=True)
        if CacheLimitExceeded.MARK in str(error):
            found = re.search(r"partition (\d+) alone passed (\d+) bytes", str(error))
            partition, size = (int(found.group(1)), int(found.group(2))) if found else (None, 0)
            raise ValueError(_over_limit(size, max_bytes or 0, partition)) from None
        raise
    return chunk_frame, stats


def uncache(df: DataFrame | CachedFrame) -> bool:
    """Free the cache of `df` (a DataFrame or the handle `cache` returned).

    Returns
    -------
    bool
        Whether a cache was freed.
    """
    cached = df if isinstance(df, CachedFrame) else cached_frame_of(df)
    if cached is None or not cached.active:
        return False
    cached.unpersist()
    return True


def cached_frame_of(df: DataFrame | None) -> CachedFrame | None:
    """The cache kept for a DataFrame with `df`'s analysed plan, or ``None``.

    Costs nothing while no cache exists; otherwise one semantic hash of `df`'s plan.
    """
    with _lock:
        candidates = [cached for cached in _caches if cached.active]
    if df is None or not candidates:
        return None
    key = session_identity(df.sparkSession)
    candidates = [cached for cached in candidates if cached.session_key == key]
    if not candidates:
        return None
    semantic_hash = df.semanticHash()
    for cached in candidates:
        if cached.semantic_hash == semantic_hash and df.sameSemantics(cached.source):
            return cached
    return None


def chunk_input(
    parts: Sequence[tuple[DataFrame, int]],
    columns: Sequence[str],
    num_ranks: int,
    *,
    tag_column: str,
) -> DataFrame | None:
    """Chunk rows for one job, spread over exactly `num_ranks` partitions.

    Each part is a DataFrame and its tag (the split: train or validation), which every row
    carries in `tag_column`. A cached part's rows are dealt to the ranks in contiguous,
    balanced runs computed from the known counts (a chunk on a boundary is read in slices by
    two ranks); a part that is not cached is converted on the fly (its `columns` only), its
    rows dealt round-robin. The rows move to their rank with one shuffle
    (`spark_versions.repartition_by_rank`), which also keeps the union apart from the barrier
    stage that reads them. A single cached part with
    one partition per rank is read where it is, without a shuffle (as `job_input` keeps a
    DataFrame that already has `num_ranks` partitions).

    Returns ``None`` when no part is cached, or when the parts' `columns` differ in type (only
    a union of their rows could widen them to common types): then the job reads the rows.
    """
    from pyspark.sql import functions as F

    found = [cached_frame_of(frame) for frame, _ in parts]
    if not any(found) or not _same_types([frame for frame, _ in parts], columns):
        return None
    (first, *_), tag = found, parts[0][1]
    if len(parts) == 1 and first is not None and first.partitions == num_ranks:
        # As a DataFrame that has one partition per rank: read where it is, no shuffle.
        return first.chunk_frame.select(
            CHUNK_COLUMN,
            F.lit(0).alias(SLICE_START_COLUMN),
            F.col(ROWS_COLUMN).alias(SLICE_ROWS_COLUMN),
            F.lit(tag).cast("int").alias(tag_column),
        )
    frames = []
    for (frame, tag), cached in zip(parts, found, strict=True):
        if cached is not None:
            frames.append(_ranked_chunks(cached, num_ranks, tag_column, tag))
        else:
            frames.append(_converted_chunks(frame, columns, num_ranks, tag_column, tag))
    data = frames[0]
    for other in frames[1:]:
        data = data.unionByName(other)
    return repartition_by_rank(data, num_ranks, RANK_COLUMN)


def _same_types(frames: Sequence[DataFrame], columns: Sequence[str]) -> bool:
    kinds = [{field.name: field.dataType for field in frame.schema.fields} for frame in frames]
    return all(types.get(name) == kinds[0].get(name) for types in kinds for name in columns)


def _ranked_chunks(cached: CachedFrame, num_ranks: int, tag_column: str, tag: int) -> DataFrame:
    """The cached chunks, one row per (chunk, rank that reads part of it).

    Rank ``r`` reads rows ``[T*r // W, T*(r+1) // W)`` of the frame in (partition, row) order
    (``T`` rows, ``W`` ranks), so the ranks' counts differ by at most one. Row ``i`` belongs
    to rank ``((i + 1) * W - 1) // T``. Planned once per (ranks, tag) and kept on `cached`.
    """
    key = (num_ranks, tag_column, tag)
    planned = cached.ranked.get(key)
    if planned is None:
        planned = cached.ranked[key] = _plan_ranked_chunks(cached, num_ranks, tag_column, tag)
    return planned


def _plan_ranked_chunks(
    cached: CachedFrame, num_ranks: int, tag_column: str, tag: int
) -> DataFrame:
    from pyspark.sql import functions as F

    total = max(cached.rows, 1)
    table = cached.chunk_table
    partitions = table.column(PARTITION_COLUMN).to_numpy()
    rows = table.column(ROWS_COLUMN).to_numpy().astype(np.int64)
    per_partition = np.bincount(partitions, weights=rows, minlength=int(partitions.max()) + 1)
    offsets = np.concatenate([[0], np.cumsum(per_partition)[:-1]]).astype(np.int64)
    first = f"(element_at(array({', '.join(str(int(o)) for o in offsets)}), "
    first += f"{PARTITION_COLUMN} + 1) + {FIRST_ROW_COLUMN})"
    last = f"({first} + {ROWS_COLUMN} - 1)"

    def rank_of(row: str) -> str:
        return f"CAST((({row} + 1) * {num_ranks} - 1) div {total} AS INT)"

    def boundary(rank: str) -> str:
        return f"(CAST({total} AS BIGINT) * {rank}) div {num_ranks}"

    pieces = (
        cached.chunk_frame.where(F.col(ROWS_COLUMN) > 0)
        .select(
            CHUNK_COLUMN,
            F.expr(f"{first}").alias("first_row"),
            F.expr(f"{last}").alias("last_row"),
            F.explode(F.expr(f"sequence({rank_of(first)}, {rank_of(last)})")).alias(RANK_COLUMN),
        )
        .select(
            RANK_COLUMN,
            CHUNK_COLUMN,
            F.expr(f"greatest(first_row, {boundary(RANK_COLUMN)}) - first_row").alias("start"),
            F.expr(f"least(last_row + 1, {boundary(f'({RANK_COLUMN} + 1)')}) - first_row").alias(
                "end"
            ),
        )
    )
    return pieces.select(
        F.col(RANK_COLUMN).cast("int").alias(RANK_COLUMN),
        CHUNK_COLUMN,
        F.col("start").cast("int").alias(SLICE_START_COLUMN),
        (F.col("end") - F.col("start")).cast("int").alias(SLICE_ROWS_COLUMN),
        F.lit(tag).cast("int").alias(tag_column),
    )


def _converted_chunks(
    frame: DataFrame, columns: Sequence[str], num_ranks: int, tag_column: str, tag: int
) -> DataFrame:
    """`frame`'s `columns` as job chunk rows, made on the fly (not kept)."""
    tags = {tag_column: int(tag)}
    chunk_rows, chunk_bytes = CHUNK_ROWS, CHUNK_BYTES

    def encode(batches):
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        yield from encode_for_ranks(
            batches,
            partition,
            num_ranks,
            tags,
            chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes,
        )

    schema = (
        f"{RANK_COLUMN} int, {CHUNK_COLUMN} binary, {SLICE_START_COLUMN} int, "
        f"{SLICE_ROWS_COLUMN} int, `{tag_column}` int"
    )
    return frame.select(*columns).mapInArrow(encode, schema)


def _sample(heads: list[bytes | None], df: DataFrame) -> pa.Table:
    """The first rows kept by the first partitions' chunks, in partition order."""
    batches: list[pa.RecordBatch] = []
    schema = None
    for head in heads:
        if head is None:
            continue
        schema, decoded = read_chunk(head)
        batches.extend(decoded)
        if sum(batch.num_rows for batch in batches) >= HEAD_ROWS:
            break
    if schema is None:
        return pa.table({name: pa.array([], pa.null()) for name in df.columns}).slice(0, 0)
    return pa.Table.from_batches(batches, schema).slice(0, HEAD_ROWS)


def _over_limit(size: int, limit: int, partition: int | None = None) -> str:
    found = f"the converted data takes {_readable(size)}"
    if partition is not None:
        found = f"partition {partition} alone converts to at least {_readable(size)}"
    limit_text = f" ({_readable(limit, exact=False)})" if limit >= 1024 else ""
    return (
        f"cache: {found}, more than max_bytes={limit}{limit_text}; the "
        "cache was dropped. Raise max_bytes, select fewer columns or rows before caching, or "
        "train without ds.cache"
    )


def _readable(size: int, *, exact: bool = True) -> str:
    scaled, unit = float(size), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, next_unit
    text = f"{scaled:.1f} {unit}" if unit != "bytes" else f"{size} bytes"
    return f"{size} bytes ({text})" if exact and unit != "bytes" else text


def _drop_session_caches(spark: SparkSession) -> None:
    """Unpersist every cache of `spark`; runs in `stop_context` before the session stops."""
    try:
        key = session_identity(spark)
    except Exception:  # a session whose JVM died: match its caches by their DataFrames
        key = None
    with _lock:
        mine = [
            cached
            for cached in _caches
            if cached.session_key == key or cached.source.sparkSession is spark
        ]
    for cached in mine:
        cached.unpersist()
