"""What one exchange between barrier tasks costs: Spark's `allGather` against gloo's.

deepspark's ranks exchange their row counts and rank 0's address once per fit with
`BarrierTaskContext.allGather`, then form a gloo process group. `Estimator.timings_` shows the
`rendezvous` span near one second on an idle machine; this script measures why, in one run, in
the same barrier tasks: each task times `allGather` calls, then, inside a gloo process group
formed over a file store, times `all_gather_object` calls of the same message.

Usage: python benchmarks/barrier.py [--quick]; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _common import emit_json, machine, run_logged


def exchange_times(calls: int, store_dir: str):
    def task(batches):
        import datetime

        import pyarrow as pa
        import torch.distributed as dist
        from pyspark import BarrierTaskContext

        for _ in batches:
            pass
        context = BarrierTaskContext.get()
        rank = context.partitionId()
        spark_times = []
        for call in range(calls):
            started = time.perf_counter()
            context.allGather(json.dumps({"rank": rank, "call": call}))
            spark_times.append(time.perf_counter() - started)
        store = dist.FileStore(os.path.join(store_dir, "store"), 2)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
        )
        gloo_times = []
        for call in range(calls):
            gathered = [None, None]
            started = time.perf_counter()
            dist.all_gather_object(gathered, {"rank": rank, "call": call})
            gloo_times.append(time.perf_counter() - started)
        dist.destroy_process_group()
        yield pa.RecordBatch.from_pydict(
            {
                "rank": pa.array([rank], pa.int32()),
                "spark_s": [spark_times],
                "gloo_s": [gloo_times],
            }
        )

    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    args = parser.parse_args()
    calls = 3 if args.quick else 10
    load_before = os.getloadavg()[0]

    import deepspark as ds

    spark = ds.init_context(cores=2, app_name="bench-barrier")
    schema = "rank int, spark_s array<double>, gloo_s array<double>"
    source = spark.range(2).repartition(2)
    # warm-up: the same job once, so both paths run in started Python workers
    with tempfile.TemporaryDirectory() as store_dir:
        source.mapInArrow(exchange_times(1, store_dir), schema, barrier=True).collect()
    with tempfile.TemporaryDirectory() as store_dir:
        rows = source.mapInArrow(exchange_times(calls, store_dir), schema, barrier=True)
        rows = rows.collect()
    ds.stop_context()

    spark_s = float(np.median([t for row in rows for t in row["spark_s"]]))
    gloo_s = float(np.median([t for row in rows for t in row["gloo_s"]]))
    figures = {
        "benchmark": "barrier",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "calls_per_task": calls,
        "spark_allgather_s_median": round(spark_s, 4),
        "gloo_all_gather_object_s_median": round(gloo_s, 5),
        "ratio_spark_vs_gloo": round(spark_s / gloo_s, 1),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    print(f"{'exchange of one small message':40}{'median s':>10}")
    print(f"{'BarrierTaskContext.allGather':40}{spark_s:>10.4f}")
    print(f"{'gloo all_gather_object':40}{gloo_s:>10.5f}")
    emit_json(figures)


if __name__ == "__main__":
    run_logged("barrier", main)
