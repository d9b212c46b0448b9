"""Find and end this machine's processes of one Ray cluster, by the mark in their environment.

Every process of a cluster that `deepspark.ray.start` launched (node managers, object stores,
idle Ray workers) inherits ``DEEPSPARK_RAY_CLUSTER=<cluster id>``. After Ray's own shutdown,
a worker node's idle Ray workers live on for about a minute until they notice their raylet is
gone; `end_marked_processes` ends them instead. Processes are found with psutil (which Ray
itself depends on); where a platform will not show other processes' environments, nothing is
found and the clean-up is left to Ray and Spark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

__all__ = ["CLUSTER_MARK", "end_marked_processes", "marked_processes"]

CLUSTER_MARK = "DEEPSPARK_RAY_CLUSTER"
_POLL_S = 0.2


def marked_processes(cluster_id: str) -> list[int]:
    """The ids of the live processes on this machine that carry `cluster_id`'s mark."""
    import psutil

    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:  # exited, only not reaped yet
                continue
            environment = process.environ()
        except (psutil.Error, OSError):  # gone meanwhile, or another user's process
            continue
        if environment.get(CLUSTER_MARK) == cluster_id:
            found.append(process.pid)
    return found


def end_marked_processes(cluster_id: str, *, grace_s: float = 8.0, term_s: float = 5.0) -> int:
    """Let the cluster's processes exit for `grace_s`, then SIGTERM, then SIGKILL the rest.

    Returns how many processes had to be signalled. Every wait is bounded: the call takes at
    most about ``grace_s + term_s + 2`` seconds.
    """
    if _wait_until_gone(cluster_id, grace_s):
        return 0
    remaining = marked_processes(cluster_id)
    _signal_all(remaining, signal.SIGTERM)
    if not _wait_until_gone(cluster_id, term_s):
        _signal_all(marked_processes(cluster_id), signal.SIGKILL)
        _wait_until_gone(cluster_id, 2.0)
    return len(remaining)


def _wait_until_gone(cluster_id: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while marked_processes(cluster_id):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # gone, or not ours
            os.kill(pid, signum)
