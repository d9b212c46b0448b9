"""A task's partition, spilled once to local Arrow IPC files and memory-mapped for every epoch.

Worker side: this module never imports pyspark.

Layout: one IPC file per split (train = 0, validation = 1, ...), written as the task's input
streams in, cut into blocks of about ``block_bytes`` (1 MiB by default). Reading maps the file
read-only and, per *window* of blocks (64 MiB of prepared values by default), copies the needed
columns into one prepared array, then tells the kernel it may drop the mapped pages of those
blocks (``madvise(MADV_DONTNEED)``). So a task holds about one window and a few batches,
however large its partition is; the file's pages stay in the page cache for the next epoch.

Shuffling an epoch: a seeded permutation of the blocks; consecutive blocks of that order form a
window; the rows of a window are visited in a seeded uniform permutation. A partition that fits
in one window is therefore shuffled uniformly; a larger one mixes each row with the rows of the
window it falls in (see ``docs/data.md``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from types import TracebackType

import numpy as np
import pyarrow as pa

from deepspark.data.batching import (
    Batch,
    _built,
    _check_batch_size,
    _ordered_pending,
    _PendingBatch,
    _RowReader,
    _Window,
)
from deepspark.data.plan import StepPlan, StepPolicy
from deepspark.data.readers import check_column, prepare_column
from deepspark.data.spec import ColumnKind, FeedError, TensorSpec, _numpy_dtype, normalize_specs
from deepspark.data.spill_files import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_SHUFFLE_WINDOW_BYTES,
    _MappedFile,
    _remove_tree,
    _SplitInfo,
    _write_splits,
    spill_directory,
)

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_SHUFFLE_WINDOW_BYTES",
    "PartitionSpill",
    "spill_directory",
]


class PartitionSpill:
    """A task's partition spilled to local Arrow IPC files, read back epoch after epoch.

    Create it with `PartitionSpill.write` and use it as a context manager: its files are
    removed when the ``with`` block ends, on success and on error (and, as a fallback, when
    the object is garbage-collected or the process exits normally).

    Examples
    --------
    >>> import pyarrow as pa
    >>> from deepspark.data import TensorSpec, plan_steps
    >>> data = [pa.record_batch({"x": [float(i) for i in range(10)], "y": list(range(10))})]
    >>> x, y = TensorSpec("x", "scalar"), TensorSpec("y", "scalar", dtype="int64")
    >>> with PartitionSpill.write(data) as spill:
    ...     plan = plan_steps([spill.num_rows()], batch_size=4)
    ...     batches = list(spill.epoch([x], [y], plan=plan, rank=0, epoch=0, seed=7))
    >>> [len(b) for b in batches], [b.num_real for b in batches]
    ([4, 4, 4], [4, 4, 2])
    >>> sorted(int(v) for b in batches for v in b.labels[0][: b.num_real])
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(
        self,
        root: str,
        splits: dict[int, _SplitInfo],
        schema: pa.Schema | None,
        *,
        owner: bool = True,
    ) -> None:
        self._root = root
        self._splits = splits
        self._schema = schema
        self._files: dict[int, _MappedFile] = {}
        self._checked: dict[tuple[int, tuple[TensorSpec, ...]], tuple[TensorSpec, ...]] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _remove_tree, root, os.getpid()) if owner else None

    # -- writing -----------------------------------------------------------------------------

    @classmethod
    def write(
        cls,
        batches: Iterable[pa.RecordBatch],
        directory: str | os.PathLike[str] | None = None,
        *,
        split_column: str | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> PartitionSpill:
        """Spill a task's input in one streaming pass.

        Parameters
        ----------
        batches : iterable of pyarrow.RecordBatch
            The task's input (the iterator ``mapInArrow`` passes); read once, batch by batch.
        directory : str, optional
            Where to create the spill's own subdirectory; default `spill_directory()` (Spark's
            local dirs inside a task).
        split_column : str, optional
            An integer column whose value sends each row to a split (0 = train,
            1 = validation); it is not stored. Without it every row is split 0.
        block_bytes : int
            Target size of the blocks the shuffle permutes (smaller mixes better).

        Returns
        -------
        PartitionSpill

        Raises
        ------
        FeedError
            A missing, non-integer, negative or null ``split_column``.
        """
        if block_bytes < 1:
            raise FeedError(f"block_bytes must be positive, got {block_bytes}")
        parent = spill_directory(directory)
        os.makedirs(parent, exist_ok=True)
        root = tempfile.mkdtemp(prefix="deepspark-spill-", dir=parent)
        splits, schema = _write_splits(batches, root, split_column, block_bytes)
        return cls(root, splits, schema)

    # -- facts ------------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The spill's own directory (removed on close)."""
        return self._root

    @property
    def schema(self) -> pa.Schema | None:
        """The spilled columns (``None`` if the input had no batches)."""
        return self._schema

    @property
    def splits(self) -> tuple[int, ...]:
        """The split values that hold rows."""
        return tuple(sorted(self._splits))

    def num_rows(self, split: int = 0) -> int:
        """Rows spilled for ``split`` (0 when it has none)."""
        info = self._splits.get(split)
        return info.rows if info is not None else 0

    # -- reading -----------------------------------------------------------------------------

    def epoch(
        self,
        features: TensorSpec | Sequence[TensorSpec],
        labels: TensorSpec | Sequence[TensorSpec] = (),
        *,
        plan: StepPlan,
        rank: int,
        epoch: int,
        seed: int,
        shuffle: bool = True,
        split: int = 0,
        shuffle_window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES,
        start_step: int = 0,
    ) -> Iterator[Batch]:
        """One epoch of this rank: exactly ``plan.steps_per_epoch`` batches.

        Every batch has ``plan.local_batch_sizes[rank]`` rows. Under ``"pad"`` each row
        appears exactly once among the real rows of the epoch; filler rows repeat rows from the
        start of this epoch's order (zeros when the partition is empty), as do the wrapped rows
        of ``"wrap"``. The order is a function of ``(seed, epoch, rank)``: reproducible, new
        each epoch. Columns are checked (nulls, types, lengths) before the first batch.

        Parameters
        ----------
        features, labels : TensorSpec or sequence of TensorSpec
        plan : StepPlan
            From `plan_steps` over every rank's ``num_rows(split)``.
        rank : int
            This task's rank in ``plan``.
        epoch, seed : int
            Non-negative; together with ``rank`` they fix the order.
        shuffle : bool
            ``False`` reads in spill order (still with the plan's steps and filler).
        split : int
            Which split to read.
        shuffle_window_bytes : int
            Memory for one window of prepared rows; bigger mixes better.
        start_step : int
            Skip the epoch's first steps (a resume mid-epoch): the batches that follow are
            those the whole epoch would have yielded from there; skipped ones are not built.

        Returns
        -------
        iterator of Batch
        """
        features, labels = normalize_specs(features), normalize_specs(labels)
        specs = self._check_specs(features + labels, split)
        if not 0 <= rank < plan.num_ranks:
            raise FeedError(f"rank={rank} is outside the plan's {plan.num_ranks} ranks")
        rows = self.num_rows(split)
        if plan.rows_per_rank[rank] != rows:
            raise FeedError(
                f"the plan counts {plan.rows_per_rank[rank]} rows for rank {rank}, but its "
                f"spill holds {rows} rows of split {split}; build the plan from every rank's "
                "num_rows(split)"
            )
        for name, value in (("epoch", epoch), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FeedError(f"{name} must be a non-negative integer, got {value!r}")
        _check_window(shuffle_window_bytes)
        features, labels = specs[: len(features)], specs[len(features) :]
        order_seed = (seed, epoch, rank) if shuffle else None
        pending = self._epoch_pending(specs, plan, rank, split, order_seed, shuffle_window_bytes)
        if start_step:
            pending = itertools.islice(pending, start_step, None)
        return _built(pending, features, labels)

    def _epoch_pending(
        self,
        specs: tuple[TensorSpec, ...],
        plan: StepPlan,
        rank: int,
        split: int,
        order_seed: tuple[int, int, int] | None,
        window_bytes: int,
    ) -> Iterator[_PendingBatch]:
        batch_size = plan.local_batch_sizes[rank]
        if self.num_rows(split) == 0:
            for _ in range(plan.steps_per_epoch):
                yield _PendingBatch([], batch_size, 0)
            return
        reader = _RowReader(
            lambda: self._windows(split, specs, order_seed, window_bytes),
            cyclic=plan.policy is not StepPolicy.DROP,
        )
        for step in range(plan.steps_per_epoch):
            real_rows = plan.real_rows(rank, step)
            yield _PendingBatch(reader.read(batch_size), batch_size, real_rows)

    def ordered(
        self,
        features: TensorSpec | Sequence[TensorSpec],
        labels: TensorSpec | Sequence[TensorSpec] = (),
        *,
        batch_size: int,
        split: int = 0,
        window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES,
    ) -> Iterator[Batch]:
        """One pass in spill order (evaluation): full batches, then the rest; no filler.

        Examples
        --------
        >>> import pyarrow as pa
        >>> from deepspark.data import TensorSpec
        >>> with PartitionSpill.write([pa.record_batch({"x": [1.0, 2.0, 3.0]})]) as spill:
        ...     [b.features[0].tolist() for b in spill.ordered(TensorSpec("x", "scalar"),
        ...                                                      batch_size=2)]
        [[1.0, 2.0], [3.0]]
        """
        _check_batch_size(batch_size)
        _check_window(window_bytes)
        features, labels = normalize_specs(features), normalize_specs(labels)
        specs = self._check_specs(features + labels, split)
        features, labels = specs[: len(features)], specs[len(features) :]
        return _built(
            self._ordered_pending(specs, split, batch_size, window_bytes), features, labels
        )

    def _ordered_pending(
        self, specs: tuple[TensorSpec, ...], split: int, batch_size: int, window_bytes: int
    ) -> Iterator[_PendingBatch]:
        if self.num_rows(split) == 0:
            return iter(())
        return _ordered_pending(lambda: self._windows(split, specs, None, window_bytes), batch_size)

    def resolve_specs(
        self, specs: TensorSpec | Sequence[TensorSpec], split: int = 0
    ) -> tuple[TensorSpec, ...]:
        """Check ``specs`` against the spilled columns of ``split``; fill their shapes in.

        Array, vector and decoded columns declared without a shape take it from the data, as
        `epoch` and `ordered` do; a split without rows returns the specs as they are.
        """
        return self._check_specs(normalize_specs(specs), split)

    def _check_specs(self, specs: tuple[TensorSpec, ...], split: int) -> tuple[TensorSpec, ...]:
        """Check every block's columns once per spec set; return specs with shapes filled in."""
        if not specs:
            raise FeedError("at least one feature or label spec is needed")
        if self._closed:
            raise FeedError("this PartitionSpill is closed; read it inside its `with` block")
        key = (split, specs)
        if key in self._checked:
            return self._checked[key]
        info = self._splits.get(split)
        if info is None:
            self._checked[key] = specs
            return specs
        assert self._schema is not None
        for spec in specs:
            for name in spec.columns:
                if name not in self._schema.names:
                    available = ", ".join(self._schema.names)
                    raise FeedError(
                        f"column {name!r} is not in the spilled data; available: {available}"
                    )
                if info.null_counts.get(name, 0):
                    raise FeedError(
                        f"column {name!r} has {info.null_counts[name]} null values among this "
                        f"partition's {info.rows} rows; models cannot take nulls: drop or fill "
                        f"them in Spark first (df.na.drop(subset=[{name!r}]) or df.na.fill(...))"
                    )
        shapes: list[tuple[int, ...] | None] = [None] * len(specs)
        source = self._file(split)
        columns = sorted({name for spec in specs for name in spec.columns})
        for block in range(len(info.block_rows)):
            batch = source.block(block, columns)
            for position, spec in enumerate(specs):
                # Later blocks must match the shape the first block showed.
                known = shapes[position]
                found = check_column(
                    batch, spec if known is None or spec.shape else replace(spec, shape=known)
                )
                if known is None:
                    shapes[position] = found
            source.release(batch)
        resolved = tuple(
            replace(spec, shape=shape) if shape is not None and not spec.shape else spec
            for spec, shape in zip(specs, shapes, strict=True)
        )
        self._checked[key] = resolved
        return resolved

    def _file(self, split: int) -> _MappedFile:
        source = self._files.get(split)
        if source is None:
            source = self._files[split] = _MappedFile(self._splits[split].path)
        return source

    def _prepared_row_bytes(self, split: int, specs: Sequence[TensorSpec]) -> int:
        info = self._splits[split]
        total = 0
        for spec in specs:
            if spec.kind in (ColumnKind.BINARY, ColumnKind.STRING):
                total += info.column_bytes.get(spec.columns[0], 0) // max(1, info.rows)
            else:
                itemsize = (_numpy_dtype(spec) or np.dtype(np.float32)).itemsize
                total += max(1, spec.row_numel) * itemsize
        return max(1, total)

    def _windows(
        self,
        split: int,
        specs: tuple[TensorSpec, ...],
        order_seed: tuple[int, int, int] | None,
        window_bytes: int,
    ) -> Iterator[_Window]:
        info = self._splits[split]
        rng = np.random.default_rng(order_seed) if order_seed is not None else None
        blocks = (
            np.arange(len(info.block_rows))
            if rng is None
            else rng.permutation(len(info.block_rows))
        )
        window_rows = max(1, window_bytes // self._prepared_row_bytes(split, specs))
        groups: list[list[int]] = [[]]
        rows = 0
        for block in blocks:
            if rows >= window_rows:
                groups.append([])
                rows = 0
            groups[-1].append(int(block))
            rows += info.block_rows[block]
        for group in groups:
            # No local name for the window: a suspended generator would keep it alive.
            yield self._load_window(split, specs, group, rng, only=len(groups) == 1)

    def _load_window(
        self,
        split: int,
        specs: tuple[TensorSpec, ...],
        blocks: list[int],
        rng: np.random.Generator | None,
        *,
        only: bool,
    ) -> _Window:
        info = self._splits[split]
        rows = sum(info.block_rows[block] for block in blocks)
        source = self._file(split)
        columns = sorted({name for spec in specs for name in spec.columns})
        prepared: list = []
        for spec in specs:
            if spec.kind in (ColumnKind.BINARY, ColumnKind.STRING):
                prepared.append([])
            else:
                dtype = _numpy_dtype(spec) or np.dtype(np.float32)
                prepared.append(np.empty((rows, *spec.shape), dtype=dtype))
        start = 0
        for block in blocks:
            batch = source.block(block, columns)
            stop = start + info.block_rows[block]
            for position, spec in enumerate(specs):
                target = prepared[position]
                if isinstance(target, list):
                    target.append(prepare_column(batch, spec))
                else:
                    prepare_column(batch, spec, out=target[start:stop])
            start = stop
            source.release(batch)
        # Encoded columns are copied out of the mapping here, decoded batch by batch later.
        prepared = [pa.concat_arrays(p) if isinstance(p, list) else p for p in prepared]
        order = rng.permutation(rows) if rng is not None else None
        return _Window(prepared, rows, order, only)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and remove the spill files; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        for source in self._files.values():
            source.close()
        self._files.clear()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> PartitionSpill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A copy sent to another process (e.g. a spawned DataLoader worker) reads the same
        # files but does not own them: only the original removes them.
        if self._closed:
            raise FeedError("a closed PartitionSpill cannot be sent to another process")
        return {"root": self._root, "splits": self._splits, "schema": self._schema}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["splits"], state["schema"], owner=False)

    def __repr__(self) -> str:
        rows = ", ".join(f"split {s}: {self.num_rows(s)} rows" for s in self.splits) or "empty"
        return f"PartitionSpill({self._root!r}, {rows})"


def _check_window(window_bytes: int) -> None:
    if isinstance(window_bytes, bool) or not isinstance(window_bytes, int) or window_bytes < 1:
        raise FeedError(f"the window size must be a positive number of bytes, got {window_bytes!r}")
