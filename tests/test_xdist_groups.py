"""The tiers' xdist grouping holds: a file's tests reach the scheduler as one unit."""

from __future__ import annotations

import os

import pytest


def test_a_files_tests_reach_xdist_as_one_unit(request):
    """`make test` and `make test-fast` run `--dist loadgroup`: conftest.py marks each test
    with its file's group, and xdist's scheduler keeps a group on one worker only when the
    group is in the test's id. pytest 9.2's node ids once dropped it silently
    (pytest-dev/pytest-xdist#1386), and so did marks added only outside the workers."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        pytest.skip("checks the xdist run of make test and make test-fast; this run is serial")
    assert request.node.nodeid.endswith("@tests/test_xdist_groups.py"), request.node.nodeid
