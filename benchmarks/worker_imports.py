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
    """Seconds spent importing each package of INSIDE_TORCHMETRICS, all its entries together.

    ``-X importtime`` lists each import after the ones it caused, indented by depth. A package
    can be entered more than once (transformers loads ``transformers.models.auto`` lazily,
    later): every entry of a package whose importer is not in the same package is counted.
    """
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    entries = []  # (depth, cumulative seconds, name), in the order printed
    for line in completed.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit():
                depth = (len(name) - len(name.lstrip())) // 2
                entries.append((depth, int(cumulative) / 1e6, name.strip()))
    found = dict.fromkeys(INSIDE_TORCHMETRICS, 0.0)
    for index, (depth, seconds, name) in enumerate(entries):
        package = next((p for p in INSIDE_TORCHMETRICS if _within(name, p)), None)
        if package is None:
            continue
        importer = next((e[2] for e in entries[index + 1 :] if e[0] < depth), "")
        if not _within(importer, package):
            found[package] += seconds
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


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
        name: round(statistics.median(r[name] for r in nested), 3) for name in INSIDE_TORCHMETRICS
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
