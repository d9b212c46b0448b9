"""Why a warm fit's fixed cost jumps after a pause: Spark's idle Python workers (issue #27).

`train.py` found deepspark's warm fixed cost at 0.7 s when a fit followed its own previous fit
and at 11-13 s when it followed a TorchDistributor fit. The suspected cause: Spark keeps an
idle Python worker for a limited time only (``PythonWorkerFactory`` stops workers idle for
more than a minute), so a fit after a long pause starts new workers, which import torch and
deepspark again. This measures it: the same warm fit after pauses of 0 s up to 90 s, and for
each fit the Python worker processes that were new (started during that fit).

Since `init_context` forks the workers from `deepspark.context.worker_daemon` (torch, torchmetrics
and the rank modules imported before the fork), ``--daemons`` compares that daemon with Spark's
own (``pyspark.daemon``) in the same run: one session per daemon, in alternating blocks, each
block running its pauses in a shuffled order.

Pauses run in a shuffled order, each several times. The last line printed is one JSON
object; every run is appended to benchmarks/log.jsonl.

Usage: python benchmarks/idle_workers.py [--quick] [--pauses 0 70] [--daemons]
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

from deepspark.context.workers import DAEMON_CONF, WORKER_DAEMON

DAEMONS = (WORKER_DAEMON, "pyspark.daemon")


def worker_processes() -> set[int]:
    """Spark's forked Python workers on this machine: the children of each worker daemon."""
    pids: set[int] = set()
    for process in psutil.process_iter(["cmdline"]):
        if not set(DAEMONS) & set(process.info["cmdline"] or []):
            continue
        try:
            pids.update(child.pid for child in process.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return pids


def session_fits(daemon: str | None, pauses: list[int], repeats: int, seed: int) -> list[dict]:
    """Warm fits after each pause, in one new session whose workers fork from ``daemon``."""
    import deepspark as ds

    conf = {} if daemon is None else {DAEMON_CONF: daemon}
    spark = ds.init_context(cores=2, app_name="bench-idle-workers", conf=conf)
    df = frame(spark, 20_000, seed=0)
    first, _ = fit(df)  # warm-up: the workers start and import torch and deepspark
    fit(df)
    daemon = spark.conf.get(DAEMON_CONF, "pyspark.daemon")
    fits = [{"daemon": daemon, "pause_s": None, "fixed_cost_s": round(fixed_cost(first), 3)}]
    print("first fit of the session", fits[-1], flush=True)
    order = [pause for pause in pauses for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    for pause in order:
        time.sleep(pause)
        before = worker_processes()
        est, _ = fit(df)
        after = worker_processes()
        fits.append(
            {
                "daemon": daemon,
                "pause_s": pause,
                "fixed_cost_s": round(fixed_cost(est), 3),
                "new_worker_processes": len(after - before),
            }
        )
        print(fits[-1], flush=True)
    ds.stop_context()
    return fits


def summary(fits: list[dict], pauses: list[int]) -> dict:
    first = [e["fixed_cost_s"] for e in fits if e["pause_s"] is None]
    by_pause = {"first_fit_of_session": {"fixed_costs_s": first}}
    for pause in pauses:
        mine = [entry for entry in fits if entry["pause_s"] == pause]
        by_pause[str(pause)] = {
            "fixed_cost_s_median": round(statistics.median(e["fixed_cost_s"] for e in mine), 3),
            "fixed_costs_s": [e["fixed_cost_s"] for e in mine],
            "new_worker_processes": [e["new_worker_processes"] for e in mine],
        }
    return by_pause


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two fits per pause")
    parser.add_argument("--pauses", type=int, nargs="+", default=[0, 30, 50, 70, 90])
    parser.add_argument(
        "--daemons", action="store_true", help="compare deepspark's worker daemon with Spark's"
    )
    args = parser.parse_args()
    repeats = 2 if args.quick else 3
    pauses = args.pauses
    load_before = os.getloadavg()[0]

    if args.daemons:  # blocks A B B A: each daemon runs first once
        blocks = [DAEMONS[0], DAEMONS[1], DAEMONS[1], DAEMONS[0]]
        repeats = max(1, repeats // 2)
    else:
        blocks = [None]
    fits = []
    for index, daemon in enumerate(blocks):
        fits += session_fits(daemon, pauses, repeats, seed=index)
    by_daemon = {
        daemon: summary([f for f in fits if f["daemon"] == daemon], pauses)
        for daemon in sorted({f["daemon"] for f in fits})
    }
    emit_json(
        {
            "benchmark": "idle_workers",
            "quick": args.quick,
            "date": today(),
            "machine": machine(),
            "pauses_s": pauses,
            "blocks": [daemon or "init_context default" for daemon in blocks],
            "by_daemon": by_daemon,
            "fits": fits,
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    run_logged("idle_workers", main)
