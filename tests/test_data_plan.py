"""Balanced steps: every rank derives the same plan; uneven and empty partitions; refusals."""

from __future__ import annotations

import itertools

import pytest

from deepspark.data import FeedError, StepPolicy, plan_steps

UNEVEN = [
    ([100, 100], 32),
    ([100, 7], 32),
    ([0, 50, 3], 9),
    ([1, 0, 0, 0], 4),
    ([1000, 999, 1, 0], 10),
    ([5], 5),
    ([5], 64),
]


@pytest.mark.parametrize(("rows", "batch_size"), UNEVEN)
def test_pad_uses_every_row_once_in_equal_steps(rows, batch_size):
    plan = plan_steps(rows, batch_size, "pad")
    assert sum(plan.local_batch_sizes) == batch_size
    assert max(plan.local_batch_sizes) - min(plan.local_batch_sizes) <= 1
    for rank, count in enumerate(rows):
        real = [plan.real_rows(rank, step) for step in range(plan.steps_per_epoch)]
        assert sum(real) == count  # every row exactly once
        assert all(0 <= r <= plan.local_batch_sizes[rank] for r in real)
        # real rows come first: once a rank runs out it only yields filler
        assert real == sorted(real, reverse=True)
    # no step is pure filler on every rank, and the last step still has data somewhere
    assert all(plan.global_real_rows(step) > 0 for step in range(plan.steps_per_epoch))


@pytest.mark.parametrize(("rows", "batch_size"), UNEVEN)
def test_wrap_fills_every_batch_of_nonempty_ranks(rows, batch_size):
    plan = plan_steps(rows, batch_size, StepPolicy.WRAP)
    assert plan.steps_per_epoch == plan_steps(rows, batch_size, "pad").steps_per_epoch
    for rank, count in enumerate(rows):
        for step in range(plan.steps_per_epoch):
            expected = plan.local_batch_sizes[rank] if count else 0
            assert plan.real_rows(rank, step) == expected


def test_drop_keeps_full_batches_of_the_smallest_partition():
    plan = plan_steps([100, 37, 64], 30, "drop")
    assert plan.local_batch_sizes == (10, 10, 10)
    assert plan.steps_per_epoch == 3  # 37 // 10
    assert all(plan.global_real_rows(step) == 30 for step in range(3))


def test_remainder_of_the_batch_goes_to_the_first_ranks():
    assert plan_steps([10, 10, 10], 8).local_batch_sizes == (3, 3, 2)


def test_exhaustive_small_cases_agree_with_the_definitions():
    for rows in itertools.product([0, 1, 5, 12], repeat=3):
        if not any(rows):
            continue
        for batch_size in (3, 4, 7):
            pad = plan_steps(rows, batch_size, "pad")
            local = pad.local_batch_sizes
            assert pad.steps_per_epoch == max(-(-r // b) for r, b in zip(rows, local, strict=True))
            assert [pad.real_rows_per_epoch(rank) for rank in range(3)] == list(rows)
            if min(r // b for r, b in zip(rows, local, strict=True)) > 0:
                drop = plan_steps(rows, batch_size, "drop")
                assert drop.steps_per_epoch == min(r // b for r, b in zip(rows, local, strict=True))


@pytest.mark.parametrize(
    ("rows", "batch_size", "policy", "match"),
    [
        ([10, 10, 10], 2, "pad", r"batch_size=2 is smaller than the 3 workers"),
        ([0, 0], 8, "pad", r"all 2 partitions are empty"),
        ([0, 0], 8, "wrap", r"all 2 partitions are empty"),
        ([100, 3], 16, "drop", r"worker 1 has 3 rows, fewer than its batch of 8"),
        ([100, 0], 16, "drop", r"worker 1 has 0 rows"),
        ([], 16, "pad", r"rows_per_rank is empty"),
        ([5, -1], 16, "pad", r"counts"),
        ([5], 0, "pad", r"batch_size must be a positive integer"),
        ([5], 4, "shuffle", r"policy='shuffle' is not known"),
    ],
)
def test_impossible_plans_are_refused_clearly(rows, batch_size, policy, match):
    with pytest.raises(FeedError, match=match):
        plan_steps(rows, batch_size, policy)


def test_steps_and_ranks_outside_the_plan_are_errors():
    plan = plan_steps([4, 4], 4)
    with pytest.raises(IndexError):
        plan.real_rows(2, 0)
    with pytest.raises(IndexError):
        plan.real_rows(0, plan.steps_per_epoch)
