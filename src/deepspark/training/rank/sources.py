"""Where a rank's batches come from: its Spark partition, or the user's data creator.

Both give the epoch loop (`loop.EpochRunner`) the same two things: an epoch's batches, each
with its step's real rows over every rank (the divisor of an exact mean loss), and a rank's
rows in order for evaluation. Every rank takes the same number of steps; nothing here waits
on another rank without the job's collective timeout. No pyspark here (DESIGN decision 12).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import torch

from deepspark.data import Batch
from deepspark.training.job_spec import SPLIT_COLUMN, TRAIN_SPLIT, JobKind, TrainSpec

__all__ = ["CreatorInput", "RankInput", "loader_batch", "sharded"]


class RankInput:
    """A rank's input: its first epoch streamed as it arrives, then its spill for the rest.

    The input is read (and spilled) on a background thread from the task's start, while the
    rank meets the others and builds its model.
    """

    def __init__(self, spec: TrainSpec, batches: Iterable[pa.RecordBatch], context: Any):
        from deepspark.data import StepPolicy
        from deepspark.data.stream import StreamingSpill
        from deepspark.training.rank.first_epoch import STREAMED_POLICIES

        self.spec = spec
        self.rank = context.rank
        # Validation within an epoch reads the whole spill, which ends the stream of arriving
        # rows: such a fit spills first, or the first epoch would lose the rows still queued.
        self._streams = (
            spec.kind is JobKind.FIT
            and spec.stream_first_epoch
            and StepPolicy(spec.step_policy) in STREAMED_POLICIES
            and spec.loop.validate_every_steps is None
        )
        self.stream = StreamingSpill(
            batches,
            context.spill_dir,
            split_column=SPLIT_COLUMN,
            feed_split=TRAIN_SPLIT if self._streams else None,
        )
        self._spill = None
        self._plan = None

    def can_stream(self) -> bool:
        """Whether the next epoch can train from the arriving rows (only the first can)."""
        return self._streams and self._spill is None

    def streamed_epoch(self, device: torch.device):
        """The first epoch's (batch, global real rows) pairs, from rows as they arrive."""
        from deepspark.data import plan_steps
        from deepspark.data.stream import WindowFeed
        from deepspark.training.rank.first_epoch import streamed_epoch

        spec = self.spec
        self._streams = False  # once
        local_sizes = plan_steps([1] * spec.world_size, spec.batch_size).local_batch_sizes
        feed = WindowFeed(spec.features, spec.labels, seed=spec.seed, epoch=0, rank=self.rank)
        steps = streamed_epoch(
            self.stream,
            feed,
            rank=self.rank,
            local_sizes=local_sizes,
            policy=spec.step_policy,
            device=device,
            timeout_s=spec.collective_timeout_s,
        )
        return self._unless_spilled(steps)

    def _unless_spilled(self, steps: Iterator) -> Iterator:
        """`steps`, refusing to go on once the spill was read under them (reading it ends the
        stream and drops the rows still queued)."""
        for step in steps:
            yield step
            if self._spill is not None:
                raise RuntimeError(
                    "the partition's spill was read while the first epoch streamed, so the rows "
                    "still queued would be lost (a deepspark bug; fit with "
                    "stream_first_epoch=False to avoid it)"
                )

    def spill(self):
        """The whole partition's spill; waits for the input to end."""
        if self._spill is None:
            self._streams = False
            self._spill = self.stream.finish(self.spec.collective_timeout_s)
        return self._spill

    def plan(self, device: torch.device):
        """Every epoch's steps, from every rank's row count (one all-reduce, the first time)."""
        if self._plan is None:
            import torch.distributed as dist

            from deepspark.data import plan_steps

            counts = torch.zeros((self.spec.world_size,), dtype=torch.int64, device=device)
            counts[self.rank] = self.spill().num_rows(TRAIN_SPLIT)
            dist.all_reduce(counts)
            self._plan = plan_steps(counts.tolist(), self.spec.batch_size, self.spec.step_policy)
        return self._plan

    @property
    def marks(self) -> dict[str, float]:
        """Moments of the input thread for the fit's timeline (first batch, input read)."""
        return self.stream.marks

    def epoch(self, epoch: int, start: int, device: torch.device) -> tuple[Iterator, int | None]:
        """(batch, global real rows) pairs of ``epoch`` from step ``start``, and the epoch's
        steps (``None`` while the first epoch streams in, its count not known yet)."""
        spec = self.spec
        if epoch == 0 and start == 0 and self.can_stream():
            return self.streamed_epoch(device), None
        spill, plan = self.spill(), self.plan(device)
        batches = spill.epoch(
            spec.features,
            spec.labels,
            plan=plan,
            rank=self.rank,
            epoch=epoch,
            seed=spec.seed,
            shuffle=True,
            split=TRAIN_SPLIT,
            start_step=start,
        )
        return _with_divisors(batches, plan, start), plan.steps_per_epoch

    def ordered(self, split: int, batch_size: int) -> Iterator[Batch]:
        """This rank's rows of ``split`` in spill order, for evaluation."""
        spec = self.spec
        return self.spill().ordered(spec.features, spec.labels, batch_size=batch_size, split=split)

    def close(self) -> None:
        self.stream.close()
        if self._spill is not None:
            self._spill.close()


def _with_divisors(batches: Iterable[Batch], plan, start: int = 0):
    """Each batch of a planned epoch with its step's global real-row count."""
    for step, batch in enumerate(batches, start=start):
        yield batch, plan.global_real_rows(step)


def sharded(loader: Any) -> Any:
    """Mark a data creator's loader as already holding only this rank's share.

    A creator that reads its own files by ``config["rank"]`` and ``config["world_size"]``
    returns ``sharded(loader)``; deepspark then takes every batch it yields. Other loaders are
    sharded by deepspark (see `CreatorInput`).

    Examples
    --------
    >>> sharded([1, 2])._deepspark_sharded
    True
    """
    return _Sharded(loader)


class _Sharded:
    _deepspark_sharded = True

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class CreatorInput:
    """A rank's batches from the user's data creator: ``creator(config, batch_size)``.

    The creator runs inside the rank, with ``config`` holding the estimator's config plus
    ``rank`` and ``world_size``, and returns a ``DataLoader`` (or any iterable of batches) for
    this rank's share of the global batch. deepspark shards what it returns:

    * a ``DataLoader`` over a map-style dataset with the default sampler is rebuilt with a
      ``DistributedSampler`` (training: shuffled by ``(seed, epoch)``; evaluation: a
      contiguous, ordered share per rank);
    * one that already has a ``DistributedSampler`` is used as it is (its epoch is set);
    * anything else is read in full by every rank, which keeps every ``world_size``-th batch;
    * a loader wrapped in `sharded` is taken whole.

    A batch is a tuple ``(features..., label)``, a single tensor (features only), or a dict
    read by ``feature_keys`` / ``label_keys``. Every step all ranks agree, in one all-reduce of
    two numbers, that each still has a batch and how many rows the step has over all ranks;
    the epoch ends when any rank has run out.
    """

    def __init__(self, spec: TrainSpec, rank: int, creators: dict[int, Any]):
        from deepspark.data import plan_steps

        self.spec = spec
        self.rank = rank
        self.creators = creators  # split -> creator
        self.marks: dict[str, float] = {}
        self.local_batch = plan_steps([1] * spec.world_size, spec.batch_size).local_batch_sizes[
            rank
        ]

    def can_stream(self) -> bool:
        return False

    def _loader(self, split: int, batch_size: int, *, train: bool, epoch: int) -> Any:
        spec = self.spec
        config = {**spec.program.config, "rank": self.rank, "world_size": spec.world_size}
        loader = self.creators[split](config, batch_size)
        return _shard(loader, self.rank, spec.world_size, train=train, seed=spec.seed, epoch=epoch)

    def epoch(self, epoch: int, start: int, device: torch.device) -> tuple[Iterator, None]:
        loader = self._loader(TRAIN_SPLIT, self.local_batch, train=True, epoch=epoch)
        return self._agreed(loader, start, device), None

    def _agreed(self, loader: Any, start: int, device: torch.device):
        import torch.distributed as dist

        spec = self.spec
        batches = iter(loader)
        for _ in range(start):  # a resume mid-epoch: the steps already trained
            next(batches, None)
        while True:
            batch = next(batches, None)
            converted = None if batch is None else self.convert(batch)
            vote = torch.tensor(
                [int(converted is not None), len(converted) if converted is not None else 0],
                dtype=torch.int64,
                device=device,
            )
            dist.all_reduce(vote)
            ranks_with_batch, rows = (int(value) for value in vote.tolist())
            if ranks_with_batch < spec.world_size:
                return
            yield converted, rows

    def ordered(self, split: int, batch_size: int) -> Iterator[Batch]:
        creator_split = split if split in self.creators else TRAIN_SPLIT
        loader = self._loader(creator_split, batch_size, train=False, epoch=0)
        for batch in loader:
            yield self.convert(batch)

    def convert(self, batch: Any) -> Batch:
        feature_keys, label_keys = self.spec.creator_keys or (None, None)
        return loader_batch(batch, feature_keys, label_keys)

    def close(self) -> None:
        """Nothing to release: the loaders end with their iterators."""


def loader_batch(batch: Any, feature_keys: Any = None, label_keys: Any = None) -> Batch:
    """A data creator's batch as a deepspark `Batch` (features and labels as tensors).

    Examples
    --------
    >>> b = loader_batch((torch.zeros(4, 3), torch.ones(4)))
    >>> [t.shape[0] for t in b.features], b.labels[0].tolist(), b.num_real
    ([4], [1.0, 1.0, 1.0, 1.0], 4)
    >>> loader_batch({"x": [[1.0], [2.0]], "y": [0, 1]}, ["x"], ["y"]).labels[0].tolist()
    [0, 1]
    """
    from deepspark.training.rank.structure import num_rows

    if isinstance(batch, dict):
        if feature_keys is None:
            feature_keys = [key for key in batch if key not in (label_keys or [])]
        missing = [key for key in [*feature_keys, *(label_keys or [])] if key not in batch]
        if missing:
            raise KeyError(
                f"the data creator's batch has no {missing}; its keys are {sorted(batch)}. "
                "Name dict keys with feature_cols= and label_cols="
            )
        features = tuple(_tensor(batch[key]) for key in feature_keys)
        labels = tuple(_tensor(batch[key]) for key in (label_keys or []))
    elif isinstance(batch, (tuple, list)):
        parts = tuple(_tensor(part) for part in batch)
        features, labels = (parts[:-1], parts[-1:]) if len(parts) > 1 else (parts, ())
    else:
        features, labels = (_tensor(batch),), ()
    return Batch(features, labels, num_rows((features, labels)))


def _tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {key: _tensor(item) for key, item in value.items()}
    return torch.as_tensor(value)


def _shard(loader: Any, rank: int, world: int, *, train: bool, seed: int, epoch: int) -> Any:
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
        Subset,
    )

    if getattr(loader, "_deepspark_sharded", False) or world == 1:
        return loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        sampler = loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
            return loader
        if isinstance(sampler, (RandomSampler, SequentialSampler)) and loader.batch_size:
            options = {
                "batch_size": loader.batch_size,
                "collate_fn": loader.collate_fn,
                "num_workers": loader.num_workers,
                "pin_memory": loader.pin_memory,
                "drop_last": loader.drop_last,
            }
            if train:
                shuffle = isinstance(sampler, RandomSampler)
                share = DistributedSampler(
                    loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed
                )
                share.set_epoch(epoch)
                return DataLoader(loader.dataset, sampler=share, **options)
            total = len(loader.dataset)
            bounds = [total * part // world for part in range(world + 1)]
            own = Subset(loader.dataset, range(bounds[rank], bounds[rank + 1]))
            return DataLoader(own, shuffle=False, **options)
    return _every_nth(loader, rank, world)


def _every_nth(loader: Any, rank: int, world: int):
    for index, batch in enumerate(loader):
        if index % world == rank:
            yield batch


def predict_share(
    model: torch.nn.Module,
    creator: Any,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    config: dict[str, Any],
    keys: tuple[Any, Any] | None,
) -> Iterator[pa.RecordBatch]:
    """The model's outputs on this task's share of a data creator's batches.

    Each output row carries the batch's place in the whole data (``order``) and its outputs
    as `torch.save` bytes of CPU tensors (a tensor, or a dict, tuple or list of them), so the
    driver can put every task's batches back in the data's order.
    """
    import io

    from deepspark.training.rank.structure import map_tensors

    loader = creator({**config, "rank": rank, "world_size": world_size}, batch_size)
    share = _shard(loader, rank, world_size, train=False, seed=0, epoch=0)
    contiguous = share is not loader and not isinstance(share, Iterator)
    feature_keys, label_keys = keys or (None, None)
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(share):
            features = loader_batch(batch, feature_keys, label_keys).features
            outputs = map_tensors(model(*features), lambda tensor: tensor.detach().cpu())
            buffer = io.BytesIO()
            torch.save(outputs, buffer)
            # contiguous shares: rank-major; dealt batches: every world_size-th of the whole
            order = rank * 2**32 + index if contiguous else index * world_size + rank
            yield pa.RecordBatch.from_pydict(
                {"order": [order], "payload": [buffer.getvalue()]},
                schema=pa.schema([("order", pa.int64()), ("payload", pa.binary())]),
            )
