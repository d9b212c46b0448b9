"""The first epoch of a fit, trained while the partition is still arriving. No pyspark here.

Before the input has ended no rank knows its row count, so the ranks cannot derive all steps
up front (`deepspark.data.plan_steps`). They agree window by window instead: before window
``w`` each rank waits until `window_rows` rows are queued (one batch for the first window,
twice as many for each next one, up to `MAX_WINDOW_BATCHES` batches) or its input has ended,
then one all-reduce tells every rank what every rank holds (`window_report`: rows queued, up to
that bound, and input ended or not). From those reports every rank computes the same window
(`window_plan`): how many steps, and how many real rows each rank puts into each of them. So
all ranks take the same steps and collectives, no rank waits in a collective for a step another
never takes, and each step's loss divisor (the global count of real rows) is known to all
without a further collective: the loss stays the exact mean over the global batch. Time to the
first step is one batch of rows plus one all-reduce, whatever the partition's size; the
doubling windows keep the all-reduces few.

The reports are bounded by the schedule, never by how many rows happened to have arrived: the
windows, and the rows each one shuffles together, follow from the input alone, so a seeded fit
trains the same batches however fast its input arrives (a busy machine, trials at once).

Under ``"pad"`` every row is trained exactly once, as in later epochs; under ``"drop"`` the epoch
ends when a rank whose input has ended cannot fill a batch. ``"wrap"`` needs the whole partition
(short ranks start over) and is not streamed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from deepspark.data import Batch, FeedError, StepPolicy, plan_steps
from deepspark.data.stream import StreamingSpill, WindowFeed

__all__ = [
    "MAX_WINDOW_BATCHES",
    "STREAMED_POLICIES",
    "streamed_epoch",
    "window_plan",
    "window_report",
    "window_rows",
]

STREAMED_POLICIES = (StepPolicy.PAD, StepPolicy.DROP)
MAX_WINDOW_BATCHES = 32  # the largest window, in batches of the rank


def window_rows(window: int, batch_rows: int) -> int:
    """The rows a rank waits for before window number `window` (from 0): one batch, then
    twice as many each window, up to `MAX_WINDOW_BATCHES` batches.

    >>> [window_rows(w, 8) for w in range(7)]
    [8, 16, 32, 64, 128, 256, 256]
    """
    return batch_rows * min(2 ** min(window, 30), MAX_WINDOW_BATCHES)


def window_report(queued: int, ended: bool, wanted: int) -> tuple[int, bool]:
    """What a rank reports for a window it waited `wanted` rows for: the rows it may use, and
    whether its input has ended with them.

    Rows beyond `wanted` wait for the next window, and an input that ended exactly at
    `wanted` rows is reported as going on (the next window finds it ended, with no rows): so
    the report is the same whenever the rows arrived.

    >>> window_report(100, False, 64), window_report(64, True, 64), window_report(10, True, 64)
    ((64, False), (64, False), (10, True))
    """
    if queued >= wanted:
        return wanted, False
    if not ended:
        raise FeedError(f"{queued} rows queued, fewer than the {wanted} waited for, input going on")
    return queued, True


def window_plan(
    reports: Sequence[tuple[int, bool]], local_sizes: Sequence[int], policy: StepPolicy | str
) -> tuple[list[list[int]], bool]:
    """The next window's steps: real rows per rank for each step, and whether the epoch ends.

    Parameters
    ----------
    reports : sequence of (int, bool)
        Per rank: rows queued now, and whether its input has ended. A rank whose input has not
        ended reports at least one batch of rows.
    local_sizes : sequence of int
        Rows per batch of each rank.
    policy : StepPolicy or {"pad", "drop"}

    Returns
    -------
    (list of list of int, bool)
        ``steps[s][r]`` real rows of rank ``r`` at step ``s``; and whether no window follows.

    Examples
    --------
    Rank 1's input has ended with 3 rows; rank 0 has 5 full batches queued:

    >>> window_plan([(10, False), (3, True)], [2, 2], "pad")
    ([[2, 2], [2, 1], [2, 0], [2, 0], [2, 0]], False)
    >>> window_plan([(1, True), (3, True)], [2, 2], "pad")
    ([[1, 2], [0, 1]], True)
    >>> window_plan([(10, False), (3, True)], [2, 2], "drop")
    ([[2, 2]], True)
    """
    policy = StepPolicy(policy)
    if policy not in STREAMED_POLICIES:
        raise ValueError(f"step_policy={policy.value!r} is not streamed")
    pairs = list(zip(reports, local_sizes, strict=True))
    if policy is StepPolicy.DROP:
        steps = min(queued // size for (queued, _), size in pairs)
        last = any(ended and queued // size == steps for (queued, ended), size in pairs)
        return [[size for _, size in pairs] for _ in range(steps)], last
    arriving = [queued // size for (queued, ended), size in pairs if not ended]
    if arriving:
        steps, last = min(arriving), False
    else:
        steps, last = max(-(-queued // size) for (queued, _), size in pairs), True
    window = []
    for step in range(steps):
        window.append(
            [
                size if not ended else min(size, max(0, queued - step * size))
                for (queued, ended), size in pairs
            ]
        )
    return window, last


def streamed_epoch(
    stream: StreamingSpill,
    feed: WindowFeed,
    *,
    rank: int,
    local_sizes: Sequence[int],
    policy: StepPolicy | str,
    device: torch.device,
    timeout_s: float,
) -> Iterator[tuple[Batch, int]]:
    """This rank's batches of the first epoch, each with the step's global real-row count.

    Every rank must iterate it to the end (it runs one all-reduce per window).

    Raises
    ------
    FeedError
        As `plan_steps` would: every partition empty, or ``"drop"`` with a rank that cannot
        fill one batch.
    """
    world = len(local_sizes)
    size = local_sizes[rank]
    trained = 0
    for number in itertools.count():
        wanted = window_rows(number, size)
        queued, ended = window_report(*stream.wait_rows(wanted, timeout_s), wanted)
        # NCCL moves CUDA memory only; int64 keeps row counts exact
        report = torch.zeros((world, 2), dtype=torch.int64, device=device)
        report[rank, 0] = queued
        report[rank, 1] = int(ended)
        dist.all_reduce(report)
        reports = [(int(rows), bool(flag)) for rows, flag in report.tolist()]
        window, last = window_plan(reports, local_sizes, policy)
        if not window and not trained:
            # no step at all: the same refusal (and message) as a plan over known counts
            plan_steps([rows for rows, _ in reports], sum(local_sizes), policy)
            raise FeedError("the first epoch has no step")  # plan_steps raised already
        mine = [step[rank] for step in window]
        parts = stream.take(sum(mine))
        for real_rows, batch in zip(window, feed.window(parts, mine, size), strict=True):
            trained += 1
            yield batch, sum(real_rows)
        if last:
            return
