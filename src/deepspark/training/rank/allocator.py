"""The rank process's C allocator, set for a training loop's large, short-lived tensors.

A training step allocates and frees the same large blocks (a batch, the activations, the
gradients) thousands of times. glibc's ``malloc`` serves a block above its mmap threshold
(128 KiB at first) with a fresh ``mmap`` and returns it with ``munmap`` when freed: each step
then faults every page of those blocks in again, in the kernel. glibc raises the threshold by
itself only after a process has freed such a block, so whether a rank pays this depends on
what the process happened to allocate before. Measured (issue #28, `benchmarks/RESULTS.md`):
the same rank loop ran 2.4 to 3.3 s or 3.4 to 5.9 s an epoch, with 0.13 to 0.18 or 0.55 to
0.83 million minor page faults, by the process's history alone. A fixed threshold ends that:
blocks up to `MMAP_THRESHOLD` come from the heap and are reused, and up to `TRIM_THRESHOLD` of
free heap is kept for the next step instead of being handed back to the system at once.

No pyspark here. Only glibc has these settings (``mallopt``); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "child_environment", "keep_step_memory"]

MMAP_THRESHOLD = 64 * 1024 * 1024  # blocks up to this size come from the heap
TRIM_THRESHOLD = 128 * 1024 * 1024  # free heap kept before it is handed back to the system
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_step_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; whether they were set.

    Setting either also turns off glibc's own adjustment of the threshold, so every rank
    behaves the same whatever it ran before. The settings last as long as the process (a
    reused Python worker keeps them for its later tasks).

    Examples
    --------
    >>> keep_step_memory() in (True, False)
    True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def child_environment() -> dict[str, str]:
    """The same settings for a child process, as glibc reads them from its environment.

    >>> sorted(child_environment())
    ['MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']
    """
    return {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    }
