"""Balanced steps: every rank derives the same number of steps per epoch from all row counts.

Worker side: this module never imports pyspark. Ranks exchange their row counts once (the
training engine does that through the barrier); `plan_steps` is then a pure function, so every
rank computes the same plan without further communication and no rank waits in a collective
for a step another rank never takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from deepspark.data.spec import FeedError

__all__ = ["StepPlan", "StepPolicy", "plan_steps"]


class StepPolicy(str, Enum):
    """What ranks with fewer rows do so that all ranks take the same number of steps.

    ``PAD``
        Every row is used exactly once per epoch. Steps cover the largest partition; a rank
        that runs out fills its batches with repeated rows marked as filler (``num_real``),
        which training masks out.
    ``DROP``
        Only full batches: steps are set by the smallest partition, the rest of each rank's
        (reshuffled) rows wait for the next epoch.
    ``WRAP``
        Steps as for ``PAD``, but short ranks wrap around their own rows, so every row of
        every batch counts (rows of small partitions are seen more often).
    """

    PAD = "pad"
    DROP = "drop"
    WRAP = "wrap"


@dataclass(frozen=True)
class StepPlan:
    """The steps of one epoch, identical on every rank.

    Attributes
    ----------
    steps_per_epoch : int
        Batches every rank yields per epoch.
    local_batch_sizes : tuple of int
        Rows in every batch of each rank (the global batch size split over ranks, the
        remainder going to the first ranks). Batches always have exactly this many rows.
    rows_per_rank : tuple of int
        The row count of each rank's partition.
    policy : StepPolicy
        How uneven partitions were balanced.
    """

    steps_per_epoch: int
    local_batch_sizes: tuple[int, ...]
    rows_per_rank: tuple[int, ...]
    policy: StepPolicy

    @property
    def num_ranks(self) -> int:
        return len(self.rows_per_rank)

    @property
    def global_batch_size(self) -> int:
        return sum(self.local_batch_sizes)

    def real_rows(self, rank: int, step: int) -> int:
        """Rows of real data ``rank`` contributes at ``step``; the rest of its batch is filler."""
        self._check(rank, step)
        batch_size = self.local_batch_sizes[rank]
        rows = self.rows_per_rank[rank]
        if self.policy is StepPolicy.PAD:
            return max(0, min(batch_size, rows - step * batch_size))
        if self.policy is StepPolicy.WRAP:
            return batch_size if rows else 0
        return batch_size

    def global_real_rows(self, step: int) -> int:
        """Real rows over all ranks at ``step``: the divisor of a mean loss, with no collective."""
        return sum(self.real_rows(rank, step) for rank in range(self.num_ranks))

    def real_rows_per_epoch(self, rank: int) -> int:
        """Real rows ``rank`` yields in one epoch."""
        return sum(self.real_rows(rank, step) for step in range(self.steps_per_epoch))

    def _check(self, rank: int, step: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise IndexError(f"rank {rank} is outside this plan's {self.num_ranks} ranks")
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside this plan's {self.steps_per_epoch} steps")


def plan_steps(
    rows_per_rank: Sequence[int],
    batch_size: int,
    policy: StepPolicy | str = StepPolicy.PAD,
) -> StepPlan:
    """Derive the steps of an epoch from every rank's row count and the global batch size.

    Parameters
    ----------
    rows_per_rank : sequence of int
        Rows in each rank's partition, in rank order (the same list on every rank).
    batch_size : int
        The global batch size, split over ranks; the remainder goes to the first ranks.
    policy : StepPolicy or {"pad", "drop", "wrap"}
        How uneven partitions are balanced (see `StepPolicy`).

    Returns
    -------
    StepPlan

    Raises
    ------
    FeedError
        ``batch_size`` smaller than the number of ranks, every partition empty, or ``"drop"``
        when the smallest partition cannot fill one batch.

    Examples
    --------
    >>> plan = plan_steps([10, 3], batch_size=4)
    >>> plan.steps_per_epoch, plan.local_batch_sizes
    (5, (2, 2))
    >>> [plan.real_rows(1, step) for step in range(plan.steps_per_epoch)]
    [2, 1, 0, 0, 0]
    >>> plan_steps([10, 3], batch_size=4, policy="drop").steps_per_epoch
    1
    """
    try:
        policy = StepPolicy(policy)
    except ValueError:
        known = ", ".join(repr(p.value) for p in StepPolicy)
        raise FeedError(f"policy={policy!r} is not known; use one of {known}") from None
    rows = tuple(int(count) for count in rows_per_rank)
    if not rows:
        raise FeedError("rows_per_rank is empty: a plan needs at least one rank")
    if any(count < 0 for count in rows):
        raise FeedError(f"rows_per_rank must be counts (>= 0), got {list(rows)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FeedError(f"batch_size must be a positive integer, got {batch_size!r}")
    ranks = len(rows)
    if batch_size < ranks:
        raise FeedError(
            f"batch_size={batch_size} is smaller than the {ranks} workers: each worker needs at "
            f"least one row per step; use batch_size >= {ranks} or fewer workers"
        )
    if not any(rows):
        raise FeedError(
            f"all {ranks} partitions are empty: there is no data to train on; check the "
            "DataFrame's filters, or its count before fitting"
        )
    base, extra = divmod(batch_size, ranks)
    local = tuple(base + (1 if rank < extra else 0) for rank in range(ranks))
    if policy is StepPolicy.DROP:
        steps = min(count // size for count, size in zip(rows, local, strict=True))
        if steps == 0:
            rank = min(range(ranks), key=lambda r: rows[r] // local[r])
            raise FeedError(
                f"policy='drop' keeps full batches only, but worker {rank} has {rows[rank]} "
                f"rows, fewer than its batch of {local[rank]} (batch_size={batch_size} over "
                f"{ranks} workers); use policy='pad' or 'wrap', a smaller batch_size, or "
                "repartition the DataFrame evenly"
            )
    else:
        steps = max(-(-count // size) for count, size in zip(rows, local, strict=True))
    return StepPlan(steps, local, rows, policy)
