"""Small helpers shared by the benchmarks: machine facts, tables, the final JSON line."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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


def warm_up(runs: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """Run every path once, untimed for the figures, in the order given; its seconds back.

    The same warm-up for every side of a comparison (benchmarks/README.md, "Warm and cold"):
    Python workers started, models loaded, allocators and page caches filled. The seconds are
    returned so that a benchmark may report the cold run as its own row.
    """
    seconds = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return seconds


def interleaved_rounds(
    runs: Mapping[str, Callable[[], object]], rounds: int = 3
) -> dict[str, dict[str, object]]:
    """Time each path ``rounds`` times, the paths taking turns; median, min and max per path.

    Round ``r`` starts at path ``r`` of the list (a rotation), so that no path always runs
    first after a pause or last before one: a change in the machine's load is spread over
    every path instead of being charged to whichever ran then. Warm the paths first with
    :func:`warm_up` (or time them cold on purpose). Each path's entry holds ``median_s``,
    ``min_s``, ``max_s``, ``spread`` (``max / min``) and every round's ``seconds``.
    """
    if rounds < 3:
        raise ValueError(f"rounds={rounds}: the protocol asks for at least 3 rounds")
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: summarise(values) for name, values in seconds.items()}


def summarise(seconds: Sequence[float]) -> dict[str, object]:
    """Median, min, max and spread (max / min) of one path's rounds, rounded for the log."""
    low, high = min(seconds), max(seconds)
    return {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(low, 4),
        "max_s": round(high, 4),
        "spread": round(high / low, 3) if low > 0 else None,
        "seconds": [round(value, 4) for value in seconds],
    }


def speed_ratio(path: Mapping[str, object], baseline: Mapping[str, object]) -> dict[str, float]:
    """How many times faster ``path`` ran than ``baseline`` (above 1: faster), from two
    :func:`interleaved_rounds` entries: the ratio of the medians, and its range, ``low``
    pairing the path's slowest round with the baseline's fastest and ``high`` the opposite."""
    return {
        "median": round(float(baseline["median_s"]) / float(path["median_s"]), 3),
        "low": round(float(baseline["min_s"]) / float(path["max_s"]), 3),
        "high": round(float(baseline["max_s"]) / float(path["min_s"]), 3),
    }


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
    logged_at = append_log(result)
    print(f"appended to {LOG_PATH.name}, logged_at {logged_at}", file=sys.stderr, flush=True)
    print(line, flush=True)


def run_logged(benchmark: str, main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; if it fails, still append a line saying so, then re-raise.

    A run that breaks down is a run too (benchmarks/README.md, "The log"): its line holds the
    benchmark's name, the command line and the error, so a reader sees every attempt. Every
    run also leaves a ``"started"`` line first.
    """
    # A line before the run too: a run killed from outside (SIGKILL, the OOM killer) cannot
    # write its own, and its "started" line without a result then shows it.
    append_log({"benchmark": benchmark, "started": True})
    try:
        main()
    except BaseException as err:  # KeyboardInterrupt and timeouts too: the attempt happened
        append_log({"benchmark": benchmark, "completed": False, "error": repr(err)[:500]})
        raise


def append_log(result: dict) -> str:
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
    return str(record["logged_at"])


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
            # the whole checkout (a change under src/ changes what was measured), except the
            # log, which changes with every run
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)benchmarks/log.jsonl",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head
