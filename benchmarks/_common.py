"""Small helpers shared by the benchmarks: machine facts, tables, the final JSON line."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Every run's JSON line lands here, met or missed (benchmarks/README.md, "The log").
LOG_PATH = Path(__file__).with_name("log.jsonl")


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
    line = json.dumps(result, separators=(", ", ": "))
    print(line, flush=True)
    append_log(result)


def append_log(result: dict) -> None:
    """Append one run to ``benchmarks/log.jsonl`` with what identifies it.

    The record keeps the benchmark's own JSON under ``"result"`` and adds the time, the
    command line, the commit it ran on, the machine and the load average at the end of the run,
    so that RESULTS.md can quote a line and a reader can find it.
    """
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "logged_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "commit": _commit(),
        "machine": machine(),
        "load_average_1m_end": round(load[0], 2) if load else None,
        "result": result,
    }
    with LOG_PATH.open("a") as handle:
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")


def _commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when uncommitted changes were measured."""
    try:
        root = Path(__file__).resolve().parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head
