"""`deepspark.shard`: this rank's share of a DataFrame passed to `deepspark.run`, as torch batches.

Worker side; no pyspark. The rows arrived through the run's barrier stage and were spilled to
local disk (the feed `Estimator.fit` uses: Arrow IPC, memory-mapped, reshuffled per epoch).
Every rank derives the same number of steps per epoch from all ranks' row counts, exchanged
once when `shard` is called, so a rank with fewer rows never leaves a collective waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch
import torch.utils.data

from deepspark.data import FeedError, StepPlan, TensorSpec, plan_steps
from deepspark.training.rank.function_state import active_run
from deepspark.training.run_spec import FrameHandle

__all__ = ["ShardDataset", "ShardRows", "shard"]

ColumnsArg = str | Sequence[Any] | Mapping[str, Any] | None


# size: long for its docstring, the reference of every argument; the body alone
# is under 80 lines.
def shard(
    data: FrameHandle,
    feature_cols: ColumnsArg,
    label_cols: ColumnsArg = None,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    step_policy: str = "pad",
    dtypes: Mapping[str, str] | None = None,
    decoders: Mapping[str, Callable[[Any], Any]] | None = None,
) -> ShardDataset:
    """This rank's share of a DataFrame given to `deepspark.run`, as a torch ``IterableDataset``.

    Call it inside the function `deepspark.run` runs, on every rank, with the argument that
    stood for the DataFrame (the run passes the function a handle in its place). Each pass over
    the dataset is one epoch of this rank's rows in a new order (``set_epoch`` picks the
    epoch, as with ``DistributedSampler``), in whole batches: use it directly, or as
    ``DataLoader(dataset, batch_size=None)``.

    Parameters
    ----------
    data : FrameHandle
        The function's argument that stood for a DataFrame.
    feature_cols, label_cols : str, list or dict
        Columns, as in `Estimator.fit`: a name, or a list of names (a nested list stacks
        scalar columns into one ``(n, k)`` tensor). A dict ``{key: column}`` makes every item
        a dict of tensors (features and labels together), as Hugging Face models take them.
    batch_size : int
        The global batch size, split over the ranks (like ``fit``).
    shuffle : bool
        Reshuffle every epoch (``False``: spill order, e.g. for validation).
    seed : int
        With the epoch and the rank, fixes the order.
    step_policy : {"pad", "drop", "wrap"}
        How ranks with fewer rows keep in step. ``"pad"`` (default): every row once per
        epoch, the short ranks' last batches are smaller (possibly empty). ``"wrap"``: full
        batches, short ranks repeat rows. ``"drop"``: full batches, steps of the smallest share.
    dtypes : dict, optional
        Torch dtype name by column. Default float32; integer labels, and integer columns
        named by a dict (token ids), int64.
    decoders : dict, optional
        Decode function by column, for binary and string columns.

    Returns
    -------
    ShardDataset
        ``len()`` is the number of steps per epoch, the same on every rank.

    Examples
    --------
    >>> import deepspark as ds
    >>> def train(df):  # doctest: +SKIP
    ...     batches = ds.shard(df, feature_cols=["x"], label_cols="y", batch_size=64)
    ...     for epoch in range(3):
    ...         for x, y in batches:
    ...             ...
    >>> ds.run(train, df, num_workers=2)  # doctest: +SKIP
    """
    import torch.distributed as dist

    run = active_run("deepspark.shard")
    if not isinstance(data, FrameHandle):
        raise TypeError(
            "deepspark.shard(data): pass the function's argument that stood for a DataFrame "
            f"given to deepspark.run (a FrameHandle), not {type(data).__name__}; DataFrames "
            "captured by the function itself do not reach the ranks"
        )
    if run.spill is None or data.index not in run.frame_indexes:
        raise ValueError(f"deepspark.shard: {data!r} does not belong to this run")
    keyed = isinstance(feature_cols, Mapping)
    features = _column_groups(feature_cols, "feature_cols", keyed=keyed, allow_empty=False)
    labels = _column_groups(label_cols, "label_cols", keyed=keyed, allow_empty=True)
    spill = run.spill()
    rows = spill.num_rows(data.index)
    local = None
    if rows:
        specs = _resolve(spill.schema, features, labels, dtypes or {}, decoders or {}, keyed)
        specs = spill.resolve_specs(specs, data.index)  # shapes from the data
        local = [(spec.kind.value, spec.shape, spec.dtype) for spec in specs]
    gathered: list[Any] = [None] * run.world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(gathered, (rows, local))
    else:
        gathered = [(rows, local)]
    counts = [count for count, _ in gathered]
    described = next((found for _, found in gathered if found is not None), None)
    if described is None:
        raise FeedError(
            f"deepspark.shard: the DataFrame {list(data.columns)} has no rows on any rank; "
            "check its filters (or its count) before deepspark.run"
        )
    plan = plan_steps(counts, batch_size, step_policy)
    groups = [*features, *labels]
    specs = tuple(
        TensorSpec(names, kind, tuple(shape), dtype, decode=(decoders or {}).get(names[0]))
        for (_, names, _), (kind, shape, dtype) in zip(groups, described, strict=True)
    )
    return ShardDataset(
        spill,
        specs[: len(features)],
        specs[len(features) :],
        plan=plan,
        rank=run.rank,
        split=data.index,
        keys=[key for key, _, _ in groups] if keyed else None,
        shuffle=shuffle,
        seed=seed,
    )


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's batches of a DataFrame, epoch after epoch; made by `shard`.

    Items are ``(features, labels)`` (a tensor each, or tuples of several), the features
    alone when there are no labels, or one dict when the columns were given as dicts. Only
    real rows are yielded: under ``step_policy="pad"`` a rank's last batches of an epoch may
    be smaller than the others', but every rank yields ``len(self)`` batches.
    """

    def __init__(
        self,
        spill: Any,
        features: tuple[TensorSpec, ...],
        labels: tuple[TensorSpec, ...],
        *,
        plan: StepPlan,
        rank: int,
        split: int,
        keys: list[str] | None,
        shuffle: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.spill = spill
        self.features = features
        self.labels = labels
        self.plan = plan
        self.rank = rank
        self.split = split
        self.keys = keys
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def rows_per_epoch(self) -> int:
        """Real rows this rank yields per epoch."""
        return self.plan.real_rows_per_epoch(self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (its order); later passes count on from it."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        self.epoch += 1
        batches = self.spill.epoch(
            self.features,
            self.labels,
            plan=self.plan,
            rank=self.rank,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            split=self.split,
        )
        info = torch.utils.data.get_worker_info()
        for index, batch in enumerate(batches):
            if info is not None and index % info.num_workers != info.id:
                continue
            yield self._item(batch.real())

    def rows(self) -> ShardRows:
        """This rank's rows one by one, for trainers that batch and shard a dataset themselves.

        The Hugging Face ``Trainer`` (through accelerate) wraps a map-style dataset in a
        sampler that deals each rank every ``world_size``-th batch of one shared order. The
        returned dataset claims the length of all ranks' epochs together and hands each rank
        its own rows in this dataset's order, whatever index is asked for, so every rank trains
        on its own share, and all take the same number of steps. Give the trainer a per-device
        batch size equal to this rank's share of `batch_size` (``batch_size // world_size``),
        use ``step_policy="wrap"`` or ``"drop"`` (full batches on every rank), and no
        dataloader workers.
        """
        return ShardRows(self)

    def _item(self, batch: Any) -> Any:
        tensors = (*batch.features, *batch.labels)
        if self.keys is not None:
            return dict(zip(self.keys, tensors, strict=True))
        features, labels = batch.as_pair()
        return features if not self.labels else (features, labels)


class ShardRows(torch.utils.data.Dataset):
    """A rank's rows of a `ShardDataset`, one at a time; see `ShardDataset.rows`."""

    def __init__(self, batches: ShardDataset) -> None:
        plan = batches.plan
        if plan.policy.value == "pad" and len(set(plan.rows_per_rank)) > 1:
            raise ValueError(
                "ShardDataset.rows(): the ranks hold different row counts, so under "
                'step_policy="pad" their batches differ in size; shard with '
                'step_policy="wrap" or "drop" to give every rank full batches'
            )
        self.batches = batches
        self.local_rows = plan.steps_per_epoch * plan.local_batch_sizes[batches.rank]
        self._stream: Iterator[Any] | None = None
        self._served = 0

    def __len__(self) -> int:
        return self.local_rows * self.batches.plan.num_ranks

    def __getitem__(self, index: int) -> Any:
        # The sampler's index is ignored on purpose: it numbers one order shared by all ranks,
        # while each rank's rows are only here. Each call takes the next row of this rank.
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "ShardDataset.rows() serves rows in order; use it without dataloader workers "
                "(e.g. TrainingArguments(dataloader_num_workers=0))"
            )
        if self._stream is None or self._served == self.local_rows:
            self._stream = self._row_stream()
            self._served = 0
        self._served += 1
        return next(self._stream)

    def _row_stream(self) -> Iterator[Any]:
        for item in self.batches:
            if isinstance(item, dict):
                rows = len(next(iter(item.values())))
                for row in range(rows):
                    yield {key: value[row] for key, value in item.items()}
            else:
                yield from _unbatched(item)


def _unbatched(item: Any) -> Iterator[Any]:
    if isinstance(item, torch.Tensor):
        yield from item
    elif isinstance(item, tuple):
        yield from zip(*(list(_unbatched(part)) for part in item), strict=True)
    else:  # a dict of tensors
        keys = list(item)
        for values in zip(*(item[key] for key in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _column_groups(
    cols: ColumnsArg, arg: str, *, keyed: bool, allow_empty: bool
) -> list[tuple[str, tuple[str, ...], bool]]:
    """``(key, column names, stacked)`` per tensor; the key is the dict key (or the names).

    A nested list stacks its scalar columns into one ``(n, k)`` tensor, as in `Estimator.fit`.
    """
    if cols is None or (not isinstance(cols, str) and len(cols) == 0):
        if allow_empty:
            return []
        raise ValueError(f"deepspark.shard: {arg}= is needed: name the columns to read")
    if isinstance(cols, Mapping):
        items = list(cols.items())
    elif isinstance(cols, str):
        items = [(None, cols)]
    else:
        items = [(None, item) for item in cols]
    groups = []
    for key, item in items:
        names = (item,) if isinstance(item, str) else tuple(item)
        if not names or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"deepspark.shard: {arg} takes column names (or nested lists of scalar column "
                f"names), got {item!r}"
            )
        groups.append((key or "+".join(names), names, not isinstance(item, str)))
    if keyed and not isinstance(cols, Mapping) and arg == "label_cols" and len(groups) > 1:
        raise ValueError(
            f"deepspark.shard: with dict feature_cols, give {arg} as a dict too (its keys "
            "name the labels in each item)"
        )
    return groups


def _resolve(
    schema: pa.Schema,
    features: list[tuple[str, tuple[str, ...], bool]],
    labels: list[tuple[str, tuple[str, ...], bool]],
    dtypes: Mapping[str, str],
    decoders: Mapping[str, Callable[[Any], Any]],
    keyed: bool,
) -> tuple[TensorSpec, ...]:
    """Specs from the spilled Arrow schema (shapes still open: the spill fills them in).

    Integer label columns become int64 (class ids), as in `Estimator.fit`; so do integer
    feature columns named by a dict (token ids and masks of a Hugging Face model).
    """
    specs = []
    for role, groups in (("feature", features), ("label", labels)):
        for _, names, stacked in groups:
            kinds, integral = [], True
            for name in names:
                if name not in schema.names:
                    raise FeedError(
                        f"deepspark.shard: column {name!r} is not in the DataFrame; its "
                        f"columns: {', '.join(schema.names)}"
                    )
                kind, is_integral = _kind_of(name, schema.field(name).type)
                kinds.append(kind)
                integral = integral and is_integral
            if len(names) > 1 and set(kinds) != {"scalar"}:
                raise FeedError(
                    f"deepspark.shard: {list(names)} stacks columns into one tensor, which "
                    "only scalar columns can; list the others on their own"
                )
            default = "int64" if integral and (role == "label" or keyed) else "float32"
            dtype = dtypes.get(names[0], default)
            shape = (len(names),) if stacked and kinds[0] == "scalar" else ()
            decode = decoders.get(names[0])
            specs.append(TensorSpec(names, kinds[0], shape, dtype, decode=decode))
    return tuple(specs)


def _kind_of(name: str, arrow_type: pa.DataType) -> tuple[str, bool]:
    """The column kind an Arrow type is read as, and whether its numbers are integers."""
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return "scalar", True
    if pa.types.is_floating(arrow_type):
        return "scalar", False
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        element = arrow_type.value_type
        while pa.types.is_list(element) or pa.types.is_large_list(element):
            element = element.value_type
        return "array", pa.types.is_integer(element)
    if pa.types.is_struct(arrow_type) and {"type", "size", "indices", "values"} <= {
        arrow_type.field(i).name for i in range(arrow_type.num_fields)
    }:
        return "vector", False
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary", False
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string", False
    if pa.types.is_decimal(arrow_type):
        raise FeedError(
            f"deepspark.shard: column {name!r} is a decimal ({arrow_type}); cast it to double "
            f"in Spark before deepspark.run (F.col({name!r}).cast('double'))"
        )
    raise FeedError(
        f"deepspark.shard: column {name!r} has type {arrow_type}, which cannot become a tensor; "
        "supported: numeric and boolean scalars, arrays of numbers, ML vectors, binary and "
        "string columns (with decoders=)"
    )
