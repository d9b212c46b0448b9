"""Why a warm fit's fixed cost jumps after a pause: Spark's idle Python workers (issue #27).

`train.py` found deepspark's warm fixed cost at 0.7 s when a fit followed its own previous fit
and at 11-13 s when it followed a TorchDistributor fit. The suspected cause: Spark keeps an
idle Python worker for a limited time only (``PythonWorkerFactory`` stops workers idle for
more than a minute), so a fit after a long pause starts new workers, which import torch and
deepspark again. This measures it: the same warm fit after pauses of 0 s up to 90 s, and for
each fit the Python worker processes that were new (started during that fit).

Pauses run in a shuffled order, each several times. The last line printed is one JSON
object; every run is appended to benchmarks/log.jsonl.

Usage: python benchmarks/idle_workers.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import psutil
from _common import emit_json, machine, run_logged, today
from fixed_cost import fit, fixed_cost, frame


def worker_processes() -> set[int]:
    """Spark's forked Python workers on this machine: the children of each ``pyspark.daemon``."""
    pids: set[int] = set()
    for process in psutil.process_iter(["cmdline"]):
        if "pyspark.daemon" not in (process.info["cmdline"] or []):
            continue
        try:
            pids.update(child.pid for child in process.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two fits per pause")
    args = parser.parse_args()
    repeats = 2 if args.quick else 3
    pauses = [0, 30, 50, 70, 90]
    load_before = os.getloadavg()[0]

    import deepspark as ds

    spark = ds.init_context(cores=2, app_name="bench-idle-workers")
    df = frame(spark, 20_000, seed=0)
    fit(df)  # warm-up: the workers start and import torch and deepspark
    fit(df)

    order = [pause for pause in pauses for _ in range(repeats)]
    random.Random(0).shuffle(order)
    fits = []
    for pause in order:
        time.sleep(pause)
        before = worker_processes()
        est, _ = fit(df)
        after = worker_processes()
        fits.append(
            {
                "pause_s": pause,
                "fixed_cost_s": round(fixed_cost(est), 3),
                "new_worker_processes": len(after - before),
            }
        )
        print(fits[-1], flush=True)
    ds.stop_context()

    by_pause = {}
    for pause in pauses:
        mine = [entry for entry in fits if entry["pause_s"] == pause]
        by_pause[str(pause)] = {
            "fixed_cost_s_median": round(statistics.median(e["fixed_cost_s"] for e in mine), 3),
            "fixed_costs_s": [e["fixed_cost_s"] for e in mine],
            "new_worker_processes": [e["new_worker_processes"] for e in mine],
        }
    emit_json(
        {
            "benchmark": "idle_workers",
            "quick": args.quick,
            "date": today(),
            "machine": machine(),
            "pauses_s": pauses,
            "order": order,
            "by_pause": by_pause,
            "fits": fits,
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    run_logged("idle_workers", main)
