"""The feed as a torch ``IterableDataset``, for user code that wants a ``DataLoader``.

Worker side: this module never imports pyspark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import torch.utils.data

from deepspark.data.batching import _check_batch_size, _ordered_pending, _PendingBatch, _Window
from deepspark.data.plan import StepPolicy, plan_steps
from deepspark.data.readers import prepare_column
from deepspark.data.spec import FeedError, TensorSpec, normalize_specs
from deepspark.data.spill import DEFAULT_SHUFFLE_WINDOW_BYTES, PartitionSpill

__all__ = ["ArrowPartitionDataset"]

BatchSource = (
    PartitionSpill | pa.Table | Sequence[pa.RecordBatch] | Callable[[], Iterable[pa.RecordBatch]]
)


class ArrowPartitionDataset(torch.utils.data.IterableDataset):
    """One partition's batches as a torch ``IterableDataset``.

    Each item is a whole batch ``(features, labels)``: a tensor where one spec was given, a
    tuple of tensors where several were, ``None`` for no labels. Use it with
    ``DataLoader(dataset, batch_size=None)``, since batching already happened here.

    Parameters
    ----------
    source : PartitionSpill, pyarrow.Table, list of RecordBatch, or callable
        A `PartitionSpill` gives shuffled epochs (the order follows ``seed`` and the epoch set
        with `set_epoch`). Other sources give ordered passes; a callable must return a fresh
        iterable of record batches on every call.
    features, labels : TensorSpec or sequence of TensorSpec
    batch_size : int
        Rows per batch; the last batch of an epoch holds the rest unless ``drop_last``.
    shuffle : bool, optional
        Default: ``True`` for a spill, ``False`` otherwise (other sources cannot shuffle;
        spill them first).
    seed : int
        Seed of the shuffle.
    split : int
        Which split of a spill to read.
    drop_last : bool
        Skip the last, smaller batch.
    shuffle_window_bytes : int
        See `PartitionSpill.epoch`.

    Notes
    -----
    As with ``DistributedSampler``, call ``set_epoch(n)`` before each epoch to get a new order.
    With ``DataLoader(num_workers=k)``, worker ``i`` builds batches ``i, i + k, ...``; the
    loader interleaves them back into the same sequence as with no workers.

    Examples
    --------
    >>> import pyarrow as pa
    >>> from torch.utils.data import DataLoader
    >>> from deepspark.data import TensorSpec
    >>> table = pa.table({"x": [[float(i), 0.0] for i in range(5)], "y": list(range(5))})
    >>> dataset = ArrowPartitionDataset(table, TensorSpec("x", "array", (2,)),
    ...                                 TensorSpec("y", "scalar", dtype="int64"), batch_size=2)
    >>> [tuple(x.shape) for x, y in DataLoader(dataset, batch_size=None)]
    [(2, 2), (2, 2), (1, 2)]
    """

    def __init__(
        self,
        source: BatchSource,
        features: TensorSpec | Sequence[TensorSpec],
        labels: TensorSpec | Sequence[TensorSpec] = (),
        *,
        batch_size: int,
        shuffle: bool | None = None,
        seed: int = 0,
        split: int = 0,
        drop_last: bool = False,
        shuffle_window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES,
    ) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        is_spill = isinstance(source, PartitionSpill)
        if shuffle is None:
            shuffle = is_spill
        if shuffle and not is_spill:
            raise FeedError(
                "shuffle=True needs a PartitionSpill source (other sources are read once, in "
                "order); spill the batches with PartitionSpill.write(...) first"
            )
        if not is_spill and not (isinstance(source, (pa.Table, Sequence)) or callable(source)):
            raise FeedError(
                "source must be a PartitionSpill, a pyarrow Table, a list of RecordBatch or a "
                f"callable returning record batches, got {type(source).__name__}"
            )
        self.source = source
        self.features = normalize_specs(features)
        self.labels = normalize_specs(labels)
        if not self.features and not self.labels:
            raise FeedError("ArrowPartitionDataset needs at least one feature or label spec")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.split = split
        self.drop_last = drop_last
        self.shuffle_window_bytes = shuffle_window_bytes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.epoch = epoch

    def _rows(self) -> int | None:
        source = self.source
        if isinstance(source, PartitionSpill):
            return source.num_rows(self.split)
        if isinstance(source, pa.Table):
            return source.num_rows
        if isinstance(source, Sequence):
            return sum(batch.num_rows for batch in source)
        return None

    def __len__(self) -> int:
        rows = self._rows()
        if rows is None:
            raise TypeError("the number of batches of a callable source is not known")
        if self.drop_last:
            return rows // self.batch_size
        return -(-rows // self.batch_size)

    def _pending(self) -> tuple[tuple[TensorSpec, ...], Iterator[_PendingBatch]]:
        specs = self.features + self.labels
        source = self.source
        if isinstance(source, PartitionSpill):
            specs = source._check_specs(specs, self.split)
            rows = source.num_rows(self.split)
            if not rows:
                return specs, iter(())
            if not self.shuffle:
                pending = source._ordered_pending(
                    specs, self.split, self.batch_size, self.shuffle_window_bytes
                )
                return specs, pending
            policy = StepPolicy.DROP if self.drop_last else StepPolicy.PAD
            if self.drop_last and rows < self.batch_size:
                return specs, iter(())
            plan = plan_steps([rows], self.batch_size, policy)
            order_seed = (self.seed, self.epoch, 0)
            pending = source._epoch_pending(
                specs, plan, 0, self.split, order_seed, self.shuffle_window_bytes
            )
            return specs, pending
        if isinstance(source, pa.Table):
            batches: Iterable[pa.RecordBatch] = source.to_batches()
        elif callable(source):
            batches = source()
        else:
            batches = source

        def windows() -> Iterator[_Window]:
            for batch in batches:
                yield _Window([prepare_column(batch, spec) for spec in specs], batch.num_rows)

        return specs, _ordered_pending(windows, self.batch_size, detach=False)

    def __iter__(self) -> Iterator[tuple[object, object]]:
        specs, pending = self._pending()
        features, labels = specs[: len(self.features)], specs[len(self.features) :]
        info = torch.utils.data.get_worker_info()
        for index, batch in enumerate(pending):
            if info is not None and index % info.num_workers != info.id:
                continue
            if self.drop_last and batch.num_real < self.batch_size:
                continue
            yield batch.build(features, labels).real().as_pair()
