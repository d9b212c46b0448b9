"""Small helpers shared by the benchmarks: machine facts, tables, the final JSON line."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence


def machine() -> str:
    """E.g. ``"2-core x86_64 VM, 24 GiB"`` (cores as this process may use them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            total_kib = int(handle.readline().split()[1])
        memory = f", {round(total_kib / 2**20)} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cores}-core {platform.machine()} {platform.system()}{memory}"


def today() -> str:
    return datetime.date.today().isoformat()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def emit_json(result: dict) -> None:
    """The benchmark's last line: one JSON object.

    A run started with raised priority (``nice -n -20``, so that other people's jobs on a
    shared machine take little of its CPU) says so in ``"nice"``; its load averages still
    count their runnable processes.
    """
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    if niceness:
        result = {**result, "nice": niceness}
    print(json.dumps(result, separators=(", ", ": ")), flush=True)
