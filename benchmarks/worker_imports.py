"""What a new Python worker imports before its first deepspark task, module by module (#27).

A Spark Python worker that is new (the first job of a session, or any job after the worker sat
idle for over a minute: `idle_workers.py`) imports torch, torch._dynamo (the first optimizer
step), torchmetrics (the first metric) and deepspark's rank modules before it trains. Each
round starts a fresh interpreter, imports the modules that ``init_context`` warms, in that
order, and reports the seconds of each. A second interpreter per round runs the same imports
under ``python -X importtime`` and reports, inside torchmetrics, the packages it pulls in that
deepspark never uses (transformers for BERTScore, scipy.signal for audio metrics).

The last line printed is one JSON object; every run is appended to benchmarks/log.jsonl.

Usage: python benchmarks/worker_imports.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import emit_json, machine, run_logged, today

from deepspark.context.workers import _warm_worker_modules

TIMED_IMPORTS = """
import importlib, json, sys, time
seconds = {}
for name in sys.argv[1:]:
    started = time.perf_counter()
    importlib.import_module(name)
    seconds[name] = time.perf_counter() - started
print(json.dumps(seconds))
"""
# top-level packages torchmetrics imports on its own, looked up in -X importtime's output
INSIDE_TORCHMETRICS = ("transformers", "scipy.signal", "sklearn")


def timed_imports(modules: list[str]) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", TIMED_IMPORTS, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def nested_import_seconds(modules: list[str]) -> dict[str, float]:
    """Cumulative seconds of each package in INSIDE_TORCHMETRICS, the first time it loads."""
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    found: dict[str, float] = {}
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if name in INSIDE_TORCHMETRICS and name not in found:
            found[name] = int(cumulative) / 1e6
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modules = list(_warm_worker_modules)
    load_before = os.getloadavg()[0]
    rounds = [timed_imports(modules) for _ in range(args.rounds)]
    nested = [nested_import_seconds(modules) for _ in range(args.rounds)]
    median = {name: round(statistics.median(r[name] for r in rounds), 3) for name in modules}
    inside = {
        name: round(statistics.median(r.get(name, 0.0) for r in nested), 3)
        for name in INSIDE_TORCHMETRICS
    }
    total = round(statistics.median(sum(r.values()) for r in rounds), 3)
    for name, value in median.items():
        print(f"{name:40}{value:>8.3f}")
    print(f"{'total':40}{total:>8.3f}")
    for name, value in inside.items():
        print(f"  inside torchmetrics: {name:22}{value:>8.3f}")
    emit_json(
        {
            "benchmark": "worker_imports",
            "date": today(),
            "machine": machine(),
            "python": sys.version.split()[0],
            "rounds": args.rounds,
            "modules": modules,
            "seconds_median": median,
            "total_s_median": total,
            "inside_torchmetrics_s_median": inside,
            "rounds_s": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    run_logged("worker_imports", main)
